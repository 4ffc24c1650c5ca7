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
//! (GIN-indexed `&&`), and ranks by matched terms, title terms counting twice.

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
    /// Share of the query's terms the article contains, 0 to 1.
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
            "SELECT slug, title, body, matched, in_title FROM (
                SELECT a.slug, a.title, a.body,
                       (SELECT count(*) FROM unnest($1::text[]) t WHERE t = ANY (a.terms)) AS matched,
                       (SELECT count(*) FROM unnest($1::text[]) t WHERE t = ANY (a.title_terms)) AS in_title
                  FROM kb_articles a
                 WHERE a.terms && $1::text[]
             ) s ORDER BY matched + in_title DESC, slug LIMIT $2",
            &[&q, &limit],
        )
        .await?;
    let n = q.len() as f64;
    Ok(rows
        .iter()
        .map(|r| {
            let matched: i64 = r.get(3);
            let in_title: i64 = r.get(4);
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
        check("包邮吗？shipping to Paris", &["包邮", "邮吗", "shipping", "pari"]);
        check("", &[]);
    }

    #[test]
    fn term_sets_are_sorted_and_distinct() {
        assert_eq!(term_set("refund refunds REFUND"), vec!["refund"]);
    }
}
