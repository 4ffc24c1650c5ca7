//! Test and development harnesses: cargo from inside a checkout, Windows programs under Wine, and a headless browser.
//!
//! The production `ferry` does not link this crate (`ferry-ops` takes it
//! only with its default `harness` feature, which the Dockerfile leaves
//! out; `tidy/tests/tidy.rs::the_production_cli_links_no_test_harness`
//! keeps it so). Tests take it as a dev-dependency.
//!
//! # Layout
//!
//! - [`cargo`]: the checkout's root, and a `cargo` command that does not
//!   inherit the calling test's cargo environment (which would make cargo
//!   rebuild); building a sibling binary of the running one.
//! - [`wine`]: cross-builds `ferry-agent.exe` and runs it under Wine on a
//!   headless X server ([`Wine`]), for tests of the agent's Windows side
//!   and `ferry bench agent --wine`.
//! - [`browser`]: headless Chromium driven over the DevTools protocol
//!   ([`browser::Page`]), for the dashboard's test and
//!   `ferry bench dashboard`.

pub mod browser;
pub mod cargo;
pub mod wine;

pub use wine::Wine;

pub(crate) use ferry_stack::{install, terminate, StackError};
