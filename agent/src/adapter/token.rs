//! The install's token: a random secret in the spool directory that a client proves it may read.

/// The file in the spool directory that holds the adapters' token.
pub const TOKEN_FILE: &str = "adapter.token";

/// The adapters' token in `dir` ([`TOKEN_FILE`]), made (mode 0600) on the
/// first start; a token already there is kept, so adapters keep working
/// across restarts.
pub fn load_or_create_token(dir: &std::path::Path) -> std::io::Result<String> {
    use rand::Rng as _;
    use std::io::Write as _;
    let path = dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if t.trim().len() >= 32 => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(dir)?;
    let token: String = rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(43)
        .map(char::from)
        .collect();
    let partial = dir.join(format!("{TOKEN_FILE}.partial"));
    let _ = std::fs::remove_file(&partial);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&partial)?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&partial, &path)?;
    Ok(token)
}

/// Whether `given` is `token`, in time that does not depend on where they
/// first differ.
pub(super) fn token_matches(given: &str, token: &str) -> bool {
    given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}
