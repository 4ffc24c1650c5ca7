//! Desktop collectors: samples of the foreground window and idle time,
//! filtered by the privacy rules and merged into activity spans.
//!
//! Every `poll` the collector asks the [`Desktop`] which window is in front
//! and how long the user has been idle. Identical consecutive samples extend
//! one span (heartbeat merging with a *pulsetime*, as in ActivityWatch): a
//! sample equal to the open span's, no later than `pulsetime` after its last
//! one, moves the span's end; anything else closes the span and, if it is a
//! sample, opens a new one. A closed span becomes one `activity` event whose
//! `duration_ms` covers it, so an hour in one window is one event.
//!
//! Idle time at or over `idle_timeout` turns the sample into an AFK sample
//! (`afk: true`, no window), and the switch is dated back to the last input
//! (now minus idle time), both into and out of AFK.
//!
//! The open span is saved (sealed) in the spool: durably when it opens and
//! every 10 s as it grows, so a crash loses at most 10 s of a span, never
//! the span: the next start closes it and sends it.

pub mod browser;
pub mod privacy;

use std::time::Duration;

use chrono::{DateTime, Utc};
use ferry_schema::event::{Activity, EventBody};
use ferry_schema::{AgentId, Envelope, EventId};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::platform::{Desktop, ForegroundWindow};
use crate::spool::Spool;
use privacy::{Privacy, Verdict};

/// Name of the open span's entry in the spool's state.
const OPEN_SPAN: &str = "open-span";
/// How often the growing span's end is fsynced.
const SPAN_SYNC: Duration = Duration::from_secs(10);
/// Name of the desktop collector in the heartbeat.
pub const COMPONENT: &str = "desktop";

/// One observation of the desktop.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Executable name (`notepad.exe`), empty for AFK.
    pub app: String,
    /// Window title (a browser's page title without the browser's name).
    pub title: String,
    /// Full executable path.
    pub exe: Option<String>,
    /// Process id.
    pub pid: Option<u32>,
    /// Site of a browser tab, when its title shows it.
    pub site: Option<String>,
    /// The user is away.
    pub afk: bool,
}

impl Sample {
    /// Whether two samples describe the same activity (for merging).
    fn same_as(&self, other: &Sample) -> bool {
        self.afk == other.afk && self.app == other.app && self.title == other.title && self.site == other.site
    }

    /// The sample of a foreground window: app from the executable's name,
    /// browser tabs split into page title and site.
    pub fn from_window(w: &ForegroundWindow) -> Self {
        let exe = w.exe.as_ref().map(|p| p.to_string_lossy().into_owned());
        let app = exe
            .as_deref()
            .map(|e| e.rsplit(['\\', '/']).next().unwrap_or(e).to_string())
            .unwrap_or_default();
        Sample {
            app,
            title: w.title.clone(),
            exe,
            pid: Some(w.pid),
            site: None,
            afk: false,
        }
    }

    fn afk() -> Self {
        Sample {
            afk: true,
            ..Sample::default()
        }
    }
}

/// A run of identical samples.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    /// The event id it will be published under (fixed when the span opens,
    /// so a span recovered after a crash keeps its id).
    pub id: EventId,
    /// First sample's time.
    pub start: DateTime<Utc>,
    /// Last sample's time (its end once closed).
    pub end: DateTime<Utc>,
    /// What was seen.
    pub sample: Sample,
}

impl Span {
    fn open(at: DateTime<Utc>, sample: Sample) -> Self {
        Span {
            id: EventId::new(),
            start: at,
            end: at,
            sample,
        }
    }

    /// Its length.
    pub fn duration(&self) -> Duration {
        (self.end - self.start).to_std().unwrap_or_default()
    }

    /// The activity event for this span.
    pub fn into_envelope(self, agent: &AgentId) -> Envelope {
        let duration_ms = self.duration().as_millis().try_into().unwrap_or(u64::MAX);
        Envelope {
            id: self.id,
            agent: agent.clone(),
            ts: self.start,
            body: EventBody::Activity(Activity {
                app: self.sample.app,
                title: self.sample.title,
                exe: self.sample.exe,
                pid: self.sample.pid,
                site: self.sample.site,
                afk: self.sample.afk,
                duration_ms,
            }),
        }
    }
}

/// Heartbeat merging of samples into spans.
#[derive(Debug, Clone)]
pub struct Merger {
    pulsetime: Duration,
    open: Option<Span>,
}

impl Merger {
    /// Samples further apart than `pulsetime` never merge.
    pub fn new(pulsetime: Duration) -> Self {
        Self { pulsetime, open: None }
    }

    /// The span still growing.
    pub fn open_span(&self) -> Option<&Span> {
        self.open.as_ref()
    }

    fn within_pulse(&self, last: DateTime<Utc>, at: DateTime<Utc>) -> bool {
        (at - last).to_std().is_ok_and(|d| d <= self.pulsetime)
    }

    /// `sample` seen at `at`; `since` dates a change back (AFK switches).
    /// Returns the span this closed, if any.
    pub fn push(&mut self, at: DateTime<Utc>, sample: Sample, since: Option<DateTime<Utc>>) -> Option<Span> {
        if let Some(open) = &mut self.open {
            if open.sample.same_as(&sample) && (at - open.end).to_std().is_ok_and(|d| d <= self.pulsetime) {
                open.end = at;
                return None;
            }
        }
        let closed = self.close(since.unwrap_or(at));
        let start = match (&closed, since) {
            (Some(c), Some(s)) => s.max(c.end),
            (None, Some(s)) => s.min(at),
            (_, None) => at,
        };
        let mut span = Span::open(start, sample);
        span.end = at.max(start);
        self.open = Some(span);
        closed
    }

    /// Nothing recordable at `at` (no window, excluded app): closes the open span.
    pub fn gap(&mut self, at: DateTime<Utc>) -> Option<Span> {
        self.close(at)
    }

    /// Closes the open span at `at`: extended to it when it is within the
    /// pulsetime of the last sample (the time in between was the same
    /// activity), cut back to it when it is earlier (an AFK switch dated
    /// back), else ended at the last sample.
    fn close(&mut self, at: DateTime<Utc>) -> Option<Span> {
        let mut span = self.open.take()?;
        if at < span.end {
            span.end = at.max(span.start);
        } else if self.within_pulse(span.end, at) {
            span.end = at;
        }
        Some(span)
    }

    /// Closes the open span at its last sample (shutdown).
    pub fn flush(&mut self) -> Option<Span> {
        self.open.take()
    }

    /// Continues a span saved before a restart.
    pub fn restore(&mut self, span: Span) {
        self.open = Some(span);
    }
}

/// The `[collect]` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollectSettings {
    /// How often the desktop is sampled.
    pub poll: Duration,
    /// Samples further apart than this never merge.
    pub pulsetime: Duration,
    /// Idle time from which the user counts as away.
    pub idle_timeout: Duration,
}

impl Default for CollectSettings {
    fn default() -> Self {
        Self {
            poll: Duration::from_secs(1),
            pulsetime: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(180),
        }
    }
}

/// The collector's logic, free of clocks and system calls so tests can
/// drive it: one [`Collector::tick`] per poll.
#[derive(Debug, Clone)]
pub struct Collector {
    settings: CollectSettings,
    privacy: Privacy,
    merger: Merger,
    afk: bool,
}

impl Collector {
    /// A collector with these settings and privacy rules.
    pub fn new(settings: CollectSettings, privacy: Privacy) -> Self {
        Self {
            settings,
            privacy,
            merger: Merger::new(settings.pulsetime),
            afk: false,
        }
    }

    /// The merger (to save or restore the open span).
    pub fn merger(&mut self) -> &mut Merger {
        &mut self.merger
    }

    /// One poll at `at`: the window in front (if any) and the idle time.
    /// Returns the spans it closed.
    pub fn tick(&mut self, at: DateTime<Utc>, window: Option<&ForegroundWindow>, idle: Duration) -> Vec<Span> {
        let afk = idle >= self.settings.idle_timeout;
        let since = if afk != self.afk {
            chrono::Duration::from_std(idle).ok().map(|d| at - d)
        } else {
            None
        };
        self.afk = afk;
        let closed = if afk {
            self.merger.push(at, Sample::afk(), since)
        } else {
            match window {
                None => self.merger.gap(at),
                Some(w) => match self.privacy.apply(Sample::from_window(w)) {
                    Verdict::Excluded => self.merger.gap(at),
                    Verdict::Keep(mut sample) => {
                        if let Some(tab) = browser::tab(&sample.app, &sample.title) {
                            sample.title = tab.title;
                            sample.site = tab.site;
                        }
                        self.merger.push(at, sample, since)
                    }
                },
            }
        };
        closed.into_iter().collect()
    }
}

/// Runs the desktop collector until `shutdown`: samples every poll, sends
/// each closed span as an activity event to `out` (a bounded channel: when
/// the spool cannot keep up, sampling waits), and keeps the open span in
/// `spool` so a crash does not lose it.
pub async fn run_desktop(
    mut desktop: Box<dyn Desktop>,
    mut collector: Collector,
    agent: AgentId,
    spool: Spool,
    out: mpsc::Sender<Envelope>,
    health: Health,
    shutdown: CancellationToken,
) {
    // A span left open by a crash is closed at its last sample and sent.
    match crate::spool::blocking(&spool, |s| s.get_state(OPEN_SPAN)).await {
        Ok(Some(bytes)) => match serde_json::from_slice::<Span>(&bytes) {
            Ok(span) => {
                tracing::info!(event = %span.id, app = %span.sample.app, "sending the span open before the last stop");
                if out.send(span.into_envelope(&agent)).await.is_err() {
                    return;
                }
            }
            Err(error) => tracing::warn!(%error, "saved open span unreadable; dropped"),
        },
        Ok(None) => {}
        Err(error) => tracing::warn!(%error, "cannot read the saved open span"),
    }
    let mut ticker = tokio::time::interval(collector.settings.poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut saved: Option<Span> = None;
    let mut synced = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let at = Utc::now();
        let window = match desktop.foreground() {
            Ok(w) => w,
            Err(error) => {
                health.set(COMPONENT, false, Some(error.to_string()));
                tracing::warn!(%error, "foreground window unavailable");
                None
            }
        };
        let idle = match desktop.idle() {
            Ok(d) => {
                health.set(COMPONENT, true, None);
                d
            }
            Err(error) => {
                health.set(COMPONENT, false, Some(error.to_string()));
                Duration::ZERO
            }
        };
        for span in collector.tick(at, window.as_ref(), idle) {
            tracing::debug!(app = %span.sample.app, duration_ms = span.duration().as_millis() as u64, "activity span closed");
            if out.send(span.into_envelope(&agent)).await.is_err() {
                return;
            }
        }
        let open = collector.merger().open_span().cloned();
        if open != saved {
            // A new span is saved durably at once; its growth every
            // SPAN_SYNC (in between, the disk sees it with the spool's
            // next fsync). A crash loses at most that much of a span.
            let durable = open.as_ref().map(|s| s.id) != saved.as_ref().map(|s| s.id) || synced.elapsed() >= SPAN_SYNC;
            if durable {
                synced = std::time::Instant::now();
            }
            let bytes = open.as_ref().and_then(|s| serde_json::to_vec(s).ok());
            if let Err(error) =
                crate::spool::blocking(&spool, move |s| s.put_state(OPEN_SPAN, bytes.as_deref(), durable)).await
            {
                tracing::warn!(%error, "cannot save the open span");
            }
            saved = open;
        }
    }
    if let Some(span) = collector.merger().flush() {
        if out.send(span.into_envelope(&agent)).await.is_ok() {
            if let Err(error) = crate::spool::blocking(&spool, |s| s.put_state(OPEN_SPAN, None, true)).await {
                tracing::warn!(%error, "cannot clear the open span");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn win(title: &str, exe: &str) -> ForegroundWindow {
        ForegroundWindow {
            title: title.into(),
            pid: 42,
            exe: Some(PathBuf::from(format!("C:\\Program Files\\{exe}"))),
        }
    }

    fn collector(privacy: privacy::PrivacyConfig) -> Collector {
        Collector::new(
            CollectSettings {
                poll: Duration::from_secs(1),
                pulsetime: Duration::from_secs(3),
                idle_timeout: Duration::from_secs(180),
            },
            Privacy::new(&privacy).unwrap(),
        )
    }

    #[test]
    fn an_hour_in_one_window_is_one_span() {
        let mut c = collector(Default::default());
        let w = win("notes.txt - Notepad", "notepad.exe");
        for s in 0..3600 {
            assert!(c.tick(t(s), Some(&w), Duration::from_secs(1)).is_empty());
        }
        let closed = c.tick(t(3600), Some(&win("Inbox - Google Chrome", "chrome.exe")), Duration::ZERO);
        assert_eq!(closed.len(), 1);
        let env = closed[0].clone().into_envelope(&AgentId::new("a").unwrap());
        let EventBody::Activity(a) = env.body else { panic!() };
        assert_eq!((a.app.as_str(), a.title.as_str()), ("notepad.exe", "notes.txt - Notepad"));
        assert_eq!(a.duration_ms, 3_600_000);
        assert_eq!(env.ts, t(0));
        assert_eq!(a.exe.as_deref(), Some("C:\\Program Files\\notepad.exe"));
        // The browser tab is split into page and browser.
        let open = c.merger().open_span().unwrap().clone();
        assert_eq!((open.sample.app.as_str(), open.sample.title.as_str()), ("chrome.exe", "Inbox"));
    }

    #[test]
    fn a_pause_longer_than_the_pulsetime_splits() {
        let mut c = collector(Default::default());
        let w = win("a", "x.exe");
        c.tick(t(0), Some(&w), Duration::ZERO);
        c.tick(t(1), Some(&w), Duration::ZERO);
        let closed = c.tick(t(10), Some(&w), Duration::ZERO);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].duration(), Duration::from_secs(1));
    }

    #[test]
    fn idle_over_the_timeout_is_afk_dated_back_to_the_last_input() {
        let mut c = collector(Default::default());
        let w = win("report.docx - Word", "winword.exe");
        // Input stops at t=100; the sampler sees idle grow.
        for s in 0..=100 {
            assert!(c.tick(t(s), Some(&w), Duration::ZERO).is_empty());
        }
        for s in 101..280 {
            assert!(c.tick(t(s), Some(&w), Duration::from_secs((s - 100) as u64)).is_empty());
        }
        // At t=280 idle is 180 s: away since t=100, so work ended then.
        let closed = c.tick(t(280), Some(&w), Duration::from_secs(180));
        assert_eq!(closed.len(), 1);
        assert!(!closed[0].sample.afk);
        assert_eq!((closed[0].start, closed[0].end), (t(0), t(100)));
        let afk = c.merger().open_span().unwrap().clone();
        assert!(afk.sample.afk);
        assert_eq!(afk.start, t(100));
        // Input again at t=399.5, seen at t=400: the AFK span ends then.
        for s in 281..400 {
            assert!(c.tick(t(s), Some(&w), Duration::from_secs((s - 100) as u64)).is_empty());
        }
        let closed = c.tick(t(400), Some(&w), Duration::from_millis(500));
        assert_eq!(closed.len(), 1);
        assert!(closed[0].sample.afk);
        assert_eq!(closed[0].start, t(100));
        assert_eq!(closed[0].end, t(400) - chrono::Duration::milliseconds(500));
        let back = c.merger().open_span().unwrap();
        assert!(!back.sample.afk);
        assert_eq!(back.start, closed[0].end);
    }

    #[test]
    fn afk_switch_dates_back_to_the_last_input_when_it_can() {
        let mut m = Merger::new(Duration::from_secs(3));
        m.push(t(0), Sample::default(), None);
        m.push(t(2), Sample::default(), None);
        // AFK noticed at t=3 with idle of 1 s: the work span ends at t=2.
        let closed = m.push(t(3), Sample::afk(), Some(t(2))).unwrap();
        assert_eq!(closed.end, t(2));
        assert_eq!(m.open_span().unwrap().start, t(2));
    }

    #[test]
    fn excluded_apps_and_missing_windows_close_spans_and_record_nothing() {
        let mut c = collector(privacy::PrivacyConfig {
            exclude_apps: vec!["keepass\\.exe".into()],
            ..Default::default()
        });
        let w = win("a", "x.exe");
        c.tick(t(0), Some(&w), Duration::ZERO);
        let closed = c.tick(t(1), Some(&win("vault", "KeePass.exe")), Duration::ZERO);
        assert_eq!(closed.len(), 1);
        assert!(c.merger().open_span().is_none());
        assert!(c.tick(t(2), Some(&win("vault", "KeePass.exe")), Duration::ZERO).is_empty());
        assert!(c.tick(t(3), None, Duration::ZERO).is_empty());
        assert!(c.merger().open_span().is_none());
    }
}
