//! Browser tabs: the page title and, where the title shows it, the site.
//!
//! A browser puts the active tab's title in its window title, followed by
//! its own name. One rule per browser (matched on the executable's name):
//!
//! | executable | window title | suffix removed |
//! |---|---|---|
//! | `chrome.exe` | `Page - Google Chrome` | ` - Google Chrome` |
//! | `msedge.exe` | `Page and 2 more pages - Personal - Microsoft\u{200b} Edge` | ` - Microsoft Edge` (with or without the zero-width space Edge puts in), then ` - <profile>` and ` and N more pages` |
//! | `firefox.exe` | `Page — Mozilla Firefox` | ` — Mozilla Firefox` or ` - Mozilla Firefox` (also `Private Browsing`) |
//! | `brave.exe` | `Page - Brave` | ` - Brave` |
//! | `opera.exe` | `Page - Opera` | ` - Opera` |
//! | `vivaldi.exe` | `Page - Vivaldi` | ` - Vivaldi` |
//!
//! The site is known only when the page title shows it: a page without a
//! `<title>` is shown by its URL (`example.com/path`), and extensions such
//! as "URL in title" append it (`Page - https://example.com/path`). The
//! site is then the host, lower-cased, without `www.`. Browsers expose no
//! URL to other processes without UI Automation, which this agent does not
//! use; a site is therefore never guessed.

/// What a browser window's title tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tab {
    /// The browser's name (e.g. `chrome`).
    pub browser: &'static str,
    /// The page title, without the browser's name.
    pub title: String,
    /// The site, when the title shows it.
    pub site: Option<String>,
}

/// Browser executables and their window-title suffixes.
const BROWSERS: &[(&str, &str, &[&str])] = &[
    ("chrome.exe", "chrome", &[" - Google Chrome"]),
    ("msedge.exe", "edge", &[" - Microsoft\u{200b} Edge", " - Microsoft Edge"]),
    (
        "firefox.exe",
        "firefox",
        &[
            " — Mozilla Firefox Private Browsing",
            " - Mozilla Firefox Private Browsing",
            " — Mozilla Firefox",
            " - Mozilla Firefox",
        ],
    ),
    ("brave.exe", "brave", &[" - Brave"]),
    ("opera.exe", "opera", &[" - Opera"]),
    ("vivaldi.exe", "vivaldi", &[" - Vivaldi"]),
];

/// The tab shown by browser `app` (an executable name) with window `title`;
/// `None` when `app` is not a known browser.
pub fn tab(app: &str, title: &str) -> Option<Tab> {
    let app = app.to_ascii_lowercase();
    let (_, browser, suffixes) = BROWSERS.iter().find(|(exe, _, _)| *exe == app)?;
    let mut page = title.trim();
    for suffix in *suffixes {
        if let Some(p) = page.strip_suffix(suffix) {
            page = p;
            break;
        }
    }
    if *browser == "edge" {
        page = strip_edge_extras(page);
    }
    let page = page.trim();
    Some(Tab {
        browser,
        title: page.to_string(),
        site: site_in(page),
    })
}

/// Edge adds ` - <profile name>` and ` and N more pages` (tab groups).
fn strip_edge_extras(page: &str) -> &str {
    let mut page = page;
    // A profile name is the last " - " part when the title has one more.
    if let Some((head, profile)) = page.rsplit_once(" - ") {
        if !profile.contains('.') && profile.split_whitespace().count() <= 3 && !head.is_empty() {
            page = head;
        }
    }
    if let Some(idx) = page.rfind(" and ") {
        let rest = &page[idx + 5..];
        let mut words = rest.split_whitespace();
        if let (Some(n), Some(more), Some(pages)) = (words.next(), words.next(), words.next()) {
            if n.chars().all(|c| c.is_ascii_digit()) && more == "more" && pages.starts_with("page") {
                page = &page[..idx];
            }
        }
    }
    page
}

/// The host of the first URL or bare host name in `text`.
pub fn site_in(text: &str) -> Option<String> {
    for token in text.split(|c: char| c.is_whitespace() || c == '|' || c == '(' || c == ')') {
        let token = token.trim_matches(|c: char| matches!(c, '"' | '\'' | ',' | '<' | '>' | '[' | ']'));
        let (rest, had_scheme) = match token.split_once("://") {
            Some((scheme, rest)) if matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https") => (rest, true),
            Some(_) => continue,
            None => (token, false),
        };
        let host = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = host.rsplit('@').next().unwrap_or(host);
        let host = host.split(':').next().unwrap_or(host).to_ascii_lowercase();
        // A bare word needs a path or a known-looking host to count.
        if is_host(&host) && (had_scheme || rest.contains('/') || text.trim() == token) {
            return Some(host.strip_prefix("www.").unwrap_or(&host).to_string());
        }
    }
    None
}

fn is_host(h: &str) -> bool {
    let labels: Vec<&str> = h.split('.').collect();
    labels.len() >= 2
        && labels
            .iter()
            .all(|l| !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        && labels
            .last()
            .is_some_and(|tld| tld.len() >= 2 && tld.chars().all(|c| c.is_ascii_alphabetic()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rules_per_browser() {
        let cases: &[(&str, &str, &str, Option<&str>)] = &[
            ("chrome.exe", "Inbox (3) - Gmail - Google Chrome", "Inbox (3) - Gmail", None),
            ("CHROME.EXE", "example.com/docs/intro - Google Chrome", "example.com/docs/intro", Some("example.com")),
            (
                "chrome.exe",
                "Pricing - https://www.Shop.example.cn/p?id=1 - Google Chrome",
                "Pricing - https://www.Shop.example.cn/p?id=1",
                Some("shop.example.cn"),
            ),
            (
                "msedge.exe",
                "Bing and 2 more pages - Personal - Microsoft\u{200b} Edge",
                "Bing",
                None,
            ),
            ("msedge.exe", "新标签页 - Microsoft Edge", "新标签页", None),
            ("firefox.exe", "Rust Programming Language — Mozilla Firefox", "Rust Programming Language", None),
            ("firefox.exe", "localhost:8080/admin — Mozilla Firefox Private Browsing", "localhost:8080/admin", None),
            ("firefox.exe", "taobao.com — Mozilla Firefox", "taobao.com", Some("taobao.com")),
            ("brave.exe", "Search - Brave", "Search", None),
        ];
        for (app, title, page, site) in cases {
            let t = tab(app, title).unwrap();
            assert_eq!(t.title, *page, "{app} {title}");
            assert_eq!(t.site.as_deref(), *site, "{app} {title}");
        }
        assert_eq!(tab("notepad.exe", "a - Google Chrome"), None);
    }

    #[test]
    fn sites_are_not_guessed_from_words() {
        assert_eq!(site_in("Version 1.2 notes"), None);
        assert_eq!(site_in("see file.txt"), None);
        assert_eq!(site_in("http://10.0.0.1/x"), None);
        assert_eq!(site_in("open https://user@Example.org:8443/a"), Some("example.org".into()));
        assert_eq!(site_in("ftp://example.org/a"), None);
    }
}
