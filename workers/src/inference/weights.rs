//! Model weights in the format the engine runs fastest: a GGUF file re-quantized once through candle's GGUF reader and writer, checked by sha256 and cached beside the original.
//!
//! candle (under mistral.rs) has AVX2 dot products for Q4_0, Q8_0 and the
//! K-quants, but a scalar loop for Q4_1, the format SmolLM2 ships in. A
//! model entry with `format = "q8_0"` runs a Q8_0 copy instead: made the
//! first time (`X.Q4_1.gguf` -> `X.Q8_0.gguf` in the same folder), its
//! sha256 written beside it (`X.Q8_0.gguf.sha256`) and checked at every
//! later load, so a truncated or altered copy is made again rather than
//! loaded.

use std::io::{Read as _, Seek as _};
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;
use sha2::Digest as _;

/// The format a model entry asks for (`format` in `[models.<alias>]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// The file as it is.
    #[default]
    AsIs,
    /// 8-bit blocks: the closest to the original, fast on AVX2.
    Q8_0,
    /// 4-bit blocks without offsets: smaller and fast on AVX2.
    Q4_0,
}

impl Format {
    /// The names the config accepts.
    pub const NAMES: &'static str = "\"as-is\", \"q8_0\", \"q4_0\"";

    /// `as-is`, `q8_0` or `q4_0`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "as-is" => Some(Self::AsIs),
            "q8_0" => Some(Self::Q8_0),
            "q4_0" => Some(Self::Q4_0),
            _ => None,
        }
    }

    fn dtype(self) -> Option<GgmlDType> {
        match self {
            Self::AsIs => None,
            Self::Q8_0 => Some(GgmlDType::Q8_0),
            Self::Q4_0 => Some(GgmlDType::Q4_0),
        }
    }

    /// How a reply's timings name it: the tag, or `as-is`.
    pub fn label(self) -> &'static str {
        match self {
            Self::AsIs => "as-is",
            other => other.tag(),
        }
    }

    /// The tag in file names (`Q8_0`).
    fn tag(self) -> &'static str {
        match self {
            Self::AsIs => "",
            Self::Q8_0 => "Q8_0",
            Self::Q4_0 => "Q4_0",
        }
    }

    /// GGUF's `general.file_type` for a file mostly in this format.
    fn file_type(self) -> u32 {
        match self {
            Self::AsIs => 0,
            Self::Q8_0 => 7,
            Self::Q4_0 => 2,
        }
    }
}

/// Why weights could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The original (or the copy, while checking it) could not be read.
    #[error("cannot read model weights {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The converted copy could not be written.
    #[error("cannot write converted weights {path}: {reason} (the folder must be writable once; or convert where it is and name the copy in `path` with `format = \"as-is\"`)")]
    Write {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Where `src` in `format` is cached: beside it, with its quantization tag
/// replaced (`X.Q4_1.gguf` -> `X.Q8_0.gguf`) or, without one, added
/// (`X.gguf` -> `X.Q8_0.gguf`).
pub fn cached_path(src: &Path, format: Format) -> PathBuf {
    let name = src.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let stem = name.strip_suffix(".gguf").unwrap_or(&name);
    let base = match stem.rsplit_once('.') {
        Some((base, tag)) if is_quant_tag(tag) => base,
        _ => stem,
    };
    src.with_file_name(format!("{base}.{}.gguf", format.tag()))
}

/// `Q4_1`, `q8_0`, `Q4_K_M`, `F16`, ...: a tag naming a GGUF quantization.
fn is_quant_tag(tag: &str) -> bool {
    let t = tag.to_ascii_uppercase();
    (t.starts_with('Q') || t.starts_with("IQ") || t.starts_with('F') || t.starts_with("BF"))
        && t.chars().any(|c| c.is_ascii_digit())
        && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn read_err(path: &Path) -> impl Fn(String) -> WeightsError + '_ {
    move |reason| WeightsError::Read { path: path.to_path_buf(), reason }
}

fn write_err(path: &Path) -> impl Fn(String) -> WeightsError + '_ {
    move |reason| WeightsError::Write { path: path.to_path_buf(), reason }
}

/// The sha256 of a file, as lowercase hex.
pub fn sha256_of(path: &Path) -> Result<String, WeightsError> {
    let fail = read_err(path);
    let mut file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| fail(e.to_string()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether a tensor of `dtype` is converted: every block-quantized tensor
/// not already in the target; float tensors (norms) stay as they are.
fn converts(dtype: GgmlDType, target: GgmlDType) -> bool {
    !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) && dtype != target
}

/// `src` in `format`: itself for [`Format::AsIs`] or when every quantized
/// tensor is in that format already; else the cached copy, made now when
/// it is missing or its sha256 differs from the one recorded when it was
/// written. Blocking (seconds for a small model): call it off the async
/// threads.
pub fn prepared(src: &Path, format: Format) -> Result<PathBuf, WeightsError> {
    let Some(target) = format.dtype() else {
        return Ok(src.to_path_buf());
    };
    let mut file = std::fs::File::open(src).map_err(|e| read_err(src)(e.to_string()))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| read_err(src)(e.to_string()))?;
    if content.tensor_infos.values().all(|t| !converts(t.ggml_dtype, target)) {
        return Ok(src.to_path_buf());
    }
    let cached = cached_path(src, format);
    let sum_file = PathBuf::from(format!("{}.sha256", cached.display()));
    if let (true, Ok(recorded)) = (cached.is_file(), std::fs::read_to_string(&sum_file)) {
        if sha256_of(&cached)? == recorded.trim() {
            return Ok(cached);
        }
        tracing::warn!(path = %cached.display(), "converted weights differ from their recorded sha256; converting again");
    }
    let started = std::time::Instant::now();
    let partial = PathBuf::from(format!("{}.partial.{}", cached.display(), std::process::id()));
    let result = convert(&mut file, &content, src, &partial, format, target).and_then(|()| {
        let sum = sha256_of(&partial)?;
        check(&partial, target)?;
        std::fs::rename(&partial, &cached).map_err(|e| write_err(&cached)(e.to_string()))?;
        std::fs::write(&sum_file, format!("{sum}\n")).map_err(|e| write_err(&sum_file)(e.to_string()))?;
        tracing::info!(from = %src.display(), to = %cached.display(), sha256 = %sum, secs = started.elapsed().as_secs_f32(), "weights converted");
        Ok(cached)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// Writes `content` (read from `file`) to `out` with every convertible
/// tensor re-quantized to `target`.
fn convert(
    file: &mut std::fs::File,
    content: &gguf_file::Content,
    src: &Path,
    out: &Path,
    format: Format,
    target: GgmlDType,
) -> Result<(), WeightsError> {
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    // The original's order, so the copy reads like it.
    names.sort_by_key(|n| content.tensor_infos[*n].offset);
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for name in names {
        file.rewind().map_err(|e| read_err(src)(e.to_string()))?;
        let q = content.tensor(file, name, &Device::Cpu).map_err(|e| read_err(src)(format!("tensor {name}: {e}")))?;
        let q = if converts(q.dtype(), target) {
            let dense = q.dequantize(&Device::Cpu).map_err(|e| read_err(src)(format!("tensor {name}: {e}")))?;
            QTensor::quantize(&dense, target).map_err(|e| write_err(out)(format!("tensor {name}: {e}")))?
        } else {
            q
        };
        tensors.push((name.clone(), q));
    }
    let mut metadata: Vec<(&str, gguf_file::Value)> =
        content.metadata.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    metadata.sort_by(|a, b| a.0.cmp(b.0));
    for (k, v) in metadata.iter_mut() {
        if *k == "general.file_type" {
            *v = gguf_file::Value::U32(format.file_type());
        }
    }
    let meta_refs: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let fail = write_err(out);
    let mut w = std::io::BufWriter::new(std::fs::File::create(out).map_err(|e| fail(e.to_string()))?);
    gguf_file::write(&mut w, &meta_refs, &tensor_refs).map_err(|e| fail(e.to_string()))?;
    let f = w.into_inner().map_err(|e| fail(e.error().to_string()))?;
    f.sync_all().map_err(|e| fail(e.to_string()))
}

/// Reads the written copy back: a whole GGUF whose quantized tensors are
/// all in `target`.
fn check(path: &Path, target: GgmlDType) -> Result<(), WeightsError> {
    let mut file = std::fs::File::open(path).map_err(|e| read_err(path)(e.to_string()))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| read_err(path)(e.to_string()))?;
    match content.tensor_infos.iter().find(|(_, t)| converts(t.ggml_dtype, target)) {
        Some((name, t)) => Err(write_err(path)(format!("tensor {name} came out as {:?}", t.ggml_dtype))),
        None => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_sits_beside_its_original_with_its_tag() {
        let p = |s: &str| cached_path(Path::new(s), Format::Q8_0);
        assert_eq!(p("/m/SmolLM2-135M-Instruct.Q4_1.gguf"), Path::new("/m/SmolLM2-135M-Instruct.Q8_0.gguf"));
        assert_eq!(p("/m/qwen2.5-7b-instruct-q4_k_m.gguf"), Path::new("/m/qwen2.5-7b-instruct-q4_k_m.Q8_0.gguf"));
        assert_eq!(p("/m/Qwen2.5-7B.Q4_K_M.gguf"), Path::new("/m/Qwen2.5-7B.Q8_0.gguf"));
        assert_eq!(p("/m/model.gguf"), Path::new("/m/model.Q8_0.gguf"));
        assert_eq!(p("/m/v1.5.gguf"), Path::new("/m/v1.5.Q8_0.gguf"), "a version is not a tag");
        assert_eq!(cached_path(Path::new("/m/a.F16.gguf"), Format::Q4_0), Path::new("/m/a.Q4_0.gguf"));
    }

    #[test]
    fn formats_parse_by_their_config_names() {
        assert_eq!(Format::parse("q8_0"), Some(Format::Q8_0));
        assert_eq!(Format::parse("q4_0"), Some(Format::Q4_0));
        assert_eq!(Format::parse("as-is"), Some(Format::AsIs));
        assert_eq!(Format::parse("Q8_0"), None);
        assert!(converts(GgmlDType::Q4_1, GgmlDType::Q8_0));
        assert!(!converts(GgmlDType::F32, GgmlDType::Q8_0) && !converts(GgmlDType::Q8_0, GgmlDType::Q8_0));
    }
}
