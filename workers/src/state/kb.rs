//! The knowledge base: one term scheme for Chinese and English, article upserts, top-k retrieval.
//!
//! Terms are computed here, not by PostgreSQL's text-search parser, so
//! retrieval does not depend on the server's locale or extensions:
//!
//! - Latin (and other alphabetic) words are lower-cased after NFKC, stop
//!   words dropped, a plural `s` stripped ("refunds" → "refund");
//! - CJK text (Han, kana, Hangul) has no spaces, so every pair of adjacent
//!   characters is a term ("退款政策" → "退款", "款政", "政策"), and a lone
//!   character is a term of its own.
//!
//! A query is cut the same way; an article matches when it shares a term
//! (GIN-indexed `&&`), and ranks by matched terms, title terms counting
//! twice. Its coverage is the share of the query's known terms (those some
//! article contains) that it holds; the fallback's template step uses it.

use std::collections::BTreeSet;

use tokio_postgres::GenericClient;
use unicode_normalization::UnicodeNormalization;

/// An article to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Article {
    /// Stable name (unique): re-importing the same slug updates the article.
    pub slug: String,
    /// Title.
    pub title: String,
    /// Body: the text a template answer uses.
    pub body: String,
    /// Tags.
    pub tags: Vec<String>,
}

/// A retrieved article with its score.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// The article's slug.
    pub slug: String,
    /// Title.
    pub title: String,
    /// Body.
    pub body: String,
    /// Matched terms, title terms counting twice (the rank).
    pub score: f64,
    /// Share of the query's terms the article contains, 0 to 1, counting
    /// only terms some article contains: a chat's other words (and the
    /// bigrams that straddle Chinese word boundaries) say nothing about
    /// which article fits.
    pub coverage: f64,
}

fn is_cjk(c: char) -> bool {
    matches!(u32::from(c),
        0x3040..=0x30FF      // Hiragana, Katakana
        | 0x3400..=0x4DBF    // CJK Extension A
        | 0x4E00..=0x9FFF    // CJK Unified Ideographs
        | 0xAC00..=0xD7AF    // Hangul syllables
        | 0xF900..=0xFAFF    // CJK Compatibility Ideographs
        | 0x20000..=0x2FFFF) // CJK Extensions B and later
}

const STOP_WORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "can", "do", "does", "for", "from", "how", "i", "if",
    "in", "is", "it", "me", "my", "of", "on", "or", "our", "so", "that", "the", "this", "to", "was", "we", "what",
    "when", "where", "which", "will", "with", "you", "your",
];

fn word_term(w: &str) -> Option<String> {
    if w.chars().count() < 2 || STOP_WORDS.contains(&w) {
        return None;
    }
    let stemmed = if w.len() > 3 && w.ends_with('s') && !w.ends_with("ss") && !w.ends_with("us") && !w.ends_with("is") {
        &w[..w.len() - 1]
    } else {
        w
    };
    Some(stemmed.to_string())
}

fn flush_cjk(run: &mut Vec<char>, out: &mut Vec<String>) {
    match run.len() {
        0 => {}
        1 => out.push(run[0].to_string()),
        _ => out.extend(run.windows(2).map(|p| p.iter().collect::<String>())),
    }
    run.clear();
}

fn flush_word(word: &mut String, out: &mut Vec<String>) {
    if let Some(t) = word_term(word) {
        out.push(t);
    }
    word.clear();
}

/// The terms of `text`, in order, with repeats.
pub fn terms(text: &str) -> Vec<String> {
    let norm: String = text.nfkc().collect::<String>().to_lowercase();
    let mut out = Vec::new();
    let mut cjk = Vec::new();
    let mut word = String::new();
    for c in norm.chars() {
        if is_cjk(c) {
            flush_word(&mut word, &mut out);
            cjk.push(c);
        } else if c.is_alphanumeric() {
            flush_cjk(&mut cjk, &mut out);
            word.push(c);
        } else {
            flush_word(&mut word, &mut out);
            flush_cjk(&mut cjk, &mut out);
        }
    }
    flush_word(&mut word, &mut out);
    flush_cjk(&mut cjk, &mut out);
    out
}

/// The distinct terms of `text`, sorted.
pub fn term_set(text: &str) -> Vec<String> {
    terms(text).into_iter().collect::<BTreeSet<_>>().into_iter().collect()
}

/// Whether an upsert created or changed an article.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upserted {
    /// New slug.
    Created,
    /// Existing slug, new content.
    Updated,
    /// Existing slug, same content.
    Unchanged,
}

/// Stores `a`, replacing the article of the same slug.
pub async fn upsert<C: GenericClient>(client: &C, a: &Article) -> Result<Upserted, tokio_postgres::Error> {
    let title_terms = term_set(&a.title);
    let all = term_set(&format!("{}\n{}\n{}", a.title, a.body, a.tags.join(" ")));
    let row = client
        .query_opt(
            "INSERT INTO kb_articles (slug, title, body, tags, title_terms, terms)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (slug) DO UPDATE
                SET title = EXCLUDED.title, body = EXCLUDED.body, tags = EXCLUDED.tags,
                    title_terms = EXCLUDED.title_terms, terms = EXCLUDED.terms, updated_at = now()
              WHERE (kb_articles.title, kb_articles.body, kb_articles.tags)
                    IS DISTINCT FROM (EXCLUDED.title, EXCLUDED.body, EXCLUDED.tags)
             RETURNING (xmax = 0) AS inserted",
            &[&a.slug, &a.title, &a.body, &a.tags, &title_terms, &all],
        )
        .await?;
    Ok(match row {
        None => Upserted::Unchanged,
        Some(r) if r.get::<_, bool>(0) => Upserted::Created,
        Some(_) => Upserted::Updated,
    })
}

/// The top `k` articles for `query`, best first (ties by slug). Empty when
/// the query has no terms or nothing matches.
pub async fn search<C: GenericClient>(client: &C, query: &str, k: usize) -> Result<Vec<Hit>, tokio_postgres::Error> {
    let q = term_set(query);
    if q.is_empty() || k == 0 {
        return Ok(Vec::new());
    }
    let limit = i64::try_from(k).unwrap_or(i64::MAX);
    let rows = client
        .query(
            "WITH known AS (
                SELECT count(*) AS n FROM unnest($1::text[]) t
                 WHERE EXISTS (SELECT 1 FROM kb_articles k WHERE k.terms @> ARRAY[t])
             )
             SELECT slug, title, body, matched, in_title, (SELECT n FROM known) FROM (
                SELECT a.slug, a.title, a.body,
                       (SELECT count(*) FROM unnest($1::text[]) t WHERE t = ANY (a.terms)) AS matched,
                       (SELECT count(*) FROM unnest($1::text[]) t WHERE t = ANY (a.title_terms)) AS in_title
                  FROM kb_articles a
                 WHERE a.terms && $1::text[]
             ) s ORDER BY matched + in_title DESC, slug LIMIT $2",
            &[&q, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let matched: i64 = r.get(3);
            let in_title: i64 = r.get(4);
            let n = r.get::<_, i64>(5).max(1) as f64;
            Hit {
                slug: r.get(0),
                title: r.get(1),
                body: r.get(2),
                score: (matched + in_title) as f64,
                coverage: matched as f64 / n,
            }
        })
        .collect())
}

/// Why articles could not be read from a file or folder.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A file or folder could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file's content is not a valid article.
    #[error("{origin}: {message}")]
    Invalid {
        /// File (and line, for JSONL).
        origin: String,
        /// What is wrong and what was expected.
        message: String,
    },
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonArticle {
    slug: Option<String>,
    title: String,
    body: String,
    #[serde(default)]
    tags: Vec<String>,
}

/// A slug from a title: lower-case ASCII letters and digits joined by `-`;
/// other characters (CJK too) are kept as they are.
pub fn slugify(title: &str) -> String {
    let mut out = String::new();
    for c in title.trim().chars().flat_map(char::to_lowercase) {
        if c.is_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.trim_end_matches('-').to_string()
}

fn check(a: Article, origin: &str) -> Result<Article, ImportError> {
    let invalid = |message: &str| ImportError::Invalid {
        origin: origin.to_string(),
        message: message.to_string(),
    };
    if a.slug.trim().is_empty() {
        return Err(invalid("the slug is empty (give a `slug`, or a title with letters or digits)"));
    }
    if a.title.trim().is_empty() {
        return Err(invalid("the title is empty"));
    }
    if a.body.trim().is_empty() {
        return Err(invalid("the body is empty"));
    }
    Ok(a)
}

/// Articles from JSON lines: `{"slug"?, "title", "body", "tags"?}` per line;
/// blank lines and lines starting with `#` are skipped.
pub fn parse_jsonl(text: &str, origin: &str) -> Result<Vec<Article>, ImportError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = format!("{origin}:{}", i + 1);
        let j: JsonArticle = serde_json::from_str(line).map_err(|e| ImportError::Invalid {
            origin: at.clone(),
            message: format!("{e} (expected {{\"title\": ..., \"body\": ..., \"slug\"?: ..., \"tags\"?: [...]}})"),
        })?;
        let slug = j.slug.unwrap_or_else(|| slugify(&j.title));
        out.push(check(Article { slug, title: j.title, body: j.body, tags: j.tags }, &at)?);
    }
    Ok(out)
}

/// One article from Markdown: the first `# ` line is the title, an optional
/// `tags: a, b` line right after it sets tags, the rest is the body. The
/// slug is the file's stem.
pub fn parse_markdown(text: &str, stem: &str, origin: &str) -> Result<Article, ImportError> {
    let mut lines = text.lines().skip_while(|l| l.trim().is_empty());
    let title = lines
        .next()
        .and_then(|l| l.trim().strip_prefix("# "))
        .map(|t| t.trim().to_string())
        .ok_or_else(|| ImportError::Invalid {
            origin: origin.to_string(),
            message: "the first line must be the title, as `# Title`".into(),
        })?;
    let mut rest: Vec<&str> = lines.collect();
    let mut tags = Vec::new();
    if let Some(i) = rest.iter().position(|l| !l.trim().is_empty()) {
        if let Some(t) = rest[i].trim().strip_prefix("tags:") {
            tags = t.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
            rest.remove(i);
        }
    }
    let body = rest.join("\n").trim().to_string();
    check(Article { slug: stem.to_string(), title, body, tags }, origin)
}

/// Articles from a `.jsonl` file, a `.md` file, or a folder of `.md` files
/// (sorted by name).
pub fn load_path(path: &std::path::Path) -> Result<Vec<Article>, ImportError> {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).map_err(|source| ImportError::Read { path: p.to_path_buf(), source })
    };
    let origin = |p: &std::path::Path| p.display().to_string();
    let stem = |p: &std::path::Path| p.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
    if path.is_dir() {
        let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(path)
            .map_err(|source| ImportError::Read { path: path.to_path_buf(), source })?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "md"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(ImportError::Invalid {
                origin: origin(path),
                message: "the folder holds no .md files".into(),
            });
        }
        return files.iter().map(|f| parse_markdown(&read(f)?, &stem(f), &origin(f))).collect();
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") | Some("json") => parse_jsonl(&read(path)?, &origin(path)),
        Some("md") => Ok(vec![parse_markdown(&read(path)?, &stem(path), &origin(path))?]),
        _ => Err(ImportError::Invalid {
            origin: origin(path),
            message: "expected a .jsonl file, a .md file, or a folder of .md files".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(text: &str, want: &[&str]) {
        assert_eq!(terms(text), want, "{text:?}");
    }

    #[test]
    fn terms_for_chinese_and_english() {
        check("How long do refunds take?", &["long", "refund", "take"]);
        check("退款政策", &["退款", "款政", "政策"]);
        check("我要退款!", &["我要", "要退", "退款"]);
        check("VIP会员 Discount", &["vip", "会员", "discount"]);
        check("ＲＥＦＵＮＤ　退", &["refund", "退"]);
        check("the is a", &[]);
        check("包邮吗？shipping to Paris", &["包邮", "邮吗", "shipping", "paris"]);
        check("", &[]);
    }

    #[test]
    fn markdown_and_jsonl_articles() {
        let a = parse_markdown("\n# Refunds 退款\ntags: refund, money\n\nWithin 7 days.\n\n7天内退款。\n", "refunds", "refunds.md").unwrap();
        assert_eq!(a, Article {
            slug: "refunds".into(),
            title: "Refunds 退款".into(),
            body: "Within 7 days.\n\n7天内退款。".into(),
            tags: vec!["refund".into(), "money".into()],
        });
        let b = parse_markdown("# Hours\nOpen 9-18.", "hours", "hours.md").unwrap();
        assert_eq!((b.tags.len(), b.body.as_str()), (0, "Open 9-18."));
        let j = parse_jsonl("# comment\n{\"title\": \"Opening Hours!\", \"body\": \"9-18\"}\n\n{\"slug\": \"x\", \"title\": \"T\", \"body\": \"B\", \"tags\": [\"a\"]}\n", "kb.jsonl").unwrap();
        assert_eq!(j.iter().map(|a| a.slug.as_str()).collect::<Vec<_>>(), ["opening-hours", "x"]);
        assert_eq!(slugify("  Payment / 支付方式 "), "payment-支付方式");
    }

    #[test]
    fn article_errors_name_the_file_and_what_is_wrong() {
        let err = |r: Result<Vec<Article>, ImportError>| r.unwrap_err().to_string();
        assert_eq!(err(parse_markdown("Refunds\nbody", "r", "r.md").map(|a| vec![a])), "r.md: the first line must be the title, as `# Title`");
        assert_eq!(err(parse_markdown("# T\n\n", "r", "r.md").map(|a| vec![a])), "r.md: the body is empty");
        assert!(err(parse_jsonl("{\"title\": \"T\"}", "kb.jsonl")).starts_with("kb.jsonl:1: missing field `body`"));
        assert!(err(parse_jsonl("\n{\"title\": \"T\", \"body\": \"B\", \"tag\": 1}", "kb.jsonl")).starts_with("kb.jsonl:2: unknown field `tag`"));
        assert_eq!(err(parse_jsonl("{\"title\": \"!!\", \"body\": \"B\"}", "kb.jsonl")), "kb.jsonl:1: the slug is empty (give a `slug`, or a title with letters or digits)");
    }

    #[test]
    fn the_demo_knowledge_base_parses() {
        let dir = ferry_harness::cargo::workspace_root().unwrap().join("ops/demo/kb");
        let all = load_path(&dir).unwrap();
        assert_eq!(all.len(), 6);
        assert!(all.iter().all(|a| !a.tags.is_empty()), "every demo article has tags");
    }

    #[test]
    fn term_sets_are_sorted_and_distinct() {
        assert_eq!(term_set("refund refunds REFUND"), vec!["refund"]);
    }
}
