//! The agent's periodic events: the heartbeat (CPU, memory, spool, component
//! states, version) and the prediction request (recent activities).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_schema::event::{EventBody, Heartbeat, PredictRequest, RecentActivity};
use ferry_schema::{AgentId, Envelope};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::platform;
use crate::spool::{Depth, Spool};

/// The agent's version, as the heartbeat reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// CPU use between two readings, in percent of one core.
#[derive(Debug)]
pub struct CpuMeter {
    last: Option<(Instant, Duration)>,
}

impl CpuMeter {
    /// A meter whose first reading covers the time since now.
    pub fn new() -> Self {
        Self {
            last: platform::process_usage().ok().map(|u| (Instant::now(), u.cpu)),
        }
    }

    /// Percent of one core used since the last reading, and the resident memory.
    pub fn read(&mut self) -> (f32, u64) {
        let Ok(now) = platform::process_usage() else {
            return (0.0, 0);
        };
        let at = Instant::now();
        let pct = match self.last {
            Some((t0, cpu0)) if at > t0 => {
                let wall = (at - t0).as_secs_f64();
                (now.cpu.saturating_sub(cpu0).as_secs_f64() / wall * 100.0) as f32
            }
            _ => 0.0,
        };
        self.last = Some((at, now.cpu));
        (pct, now.rss_bytes)
    }
}

impl Default for CpuMeter {
    fn default() -> Self {
        Self::new()
    }
}

/// Builds a heartbeat from the process, the spool's depth and the components.
pub fn heartbeat(agent: &AgentId, cpu: &mut CpuMeter, depth: Depth, health: &Health) -> Envelope {
    let (cpu_percent, rss_bytes) = cpu.read();
    let now_ms = chrono::Utc::now().timestamp_millis();
    Envelope::new(
        agent.clone(),
        EventBody::Heartbeat(Heartbeat {
            version: VERSION.to_string(),
            cpu_percent,
            rss_bytes,
            spool_depth: depth.events,
            oldest_unsent_ms: depth.oldest_ts_ms.map(|t| u64::try_from(now_ms - t).unwrap_or(0)),
            components: health.snapshot(),
        }),
    )
}

/// Sends a heartbeat to `out` every `every` until `shutdown`.
pub async fn run_heartbeat(
    agent: AgentId,
    every: Duration,
    spool: Spool,
    health: Health,
    out: mpsc::Sender<Envelope>,
    shutdown: CancellationToken,
) {
    let mut cpu = CpuMeter::new();
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if out.send(heartbeat(&agent, &mut cpu, spool.depth(), &health)).await.is_err() {
            return;
        }
    }
}

/// The last activities spooled, for prediction requests.
#[derive(Debug, Clone)]
pub struct RecentLog {
    inner: Arc<Mutex<(VecDeque<RecentActivity>, bool)>>,
    keep: usize,
}

impl RecentLog {
    /// Keeps the last `keep` activities.
    pub fn new(keep: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new((VecDeque::with_capacity(keep), false))),
            keep: keep.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (VecDeque<RecentActivity>, bool)> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Notes the activities among `events` (AFK spans are left out).
    pub fn observe(&self, events: &[Envelope]) {
        let mut g = self.lock();
        for env in events {
            if let EventBody::Activity(a) = &env.body {
                if a.afk {
                    continue;
                }
                if g.0.len() == self.keep {
                    g.0.pop_front();
                }
                g.0.push_back(RecentActivity {
                    at: env.ts,
                    app: a.app.clone(),
                    title: a.title.clone(),
                    duration_ms: a.duration_ms,
                });
                g.1 = true;
            }
        }
    }

    /// The recent activities, if any arrived since the last call.
    pub fn take_if_new(&self) -> Option<Vec<RecentActivity>> {
        let mut g = self.lock();
        if !g.1 {
            return None;
        }
        g.1 = false;
        Some(g.0.iter().cloned().collect())
    }
}

/// Sends a prediction request every `every` when new activities arrived.
pub async fn run_predictions(
    agent: AgentId,
    every: Duration,
    recent: RecentLog,
    out: mpsc::Sender<Envelope>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if let Some(recent) = recent.take_if_new() {
            let env = Envelope::new(agent.clone(), EventBody::Predict(PredictRequest { recent }));
            if out.send(env).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ferry_schema::event::Activity;

    #[test]
    fn recent_log_keeps_the_last_non_afk_activities() {
        let agent = AgentId::new("a").unwrap();
        let log = RecentLog::new(2);
        assert!(log.take_if_new().is_none());
        let act = |title: &str, afk: bool| {
            Envelope::new(
                agent.clone(),
                EventBody::Activity(Activity {
                    app: "x.exe".into(),
                    title: title.into(),
                    exe: None,
                    pid: None,
                    site: None,
                    afk,
                    duration_ms: 5,
                }),
            )
        };
        log.observe(&[act("1", false), act("2", false), act("away", true), act("3", false)]);
        let got: Vec<_> = log.take_if_new().unwrap().into_iter().map(|r| r.title).collect();
        assert_eq!(got, ["2", "3"]);
        assert!(log.take_if_new().is_none());
    }

    #[test]
    fn heartbeat_reports_the_spool_and_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(crate::spool::SpoolConfig::new(dir.path())).unwrap();
        let agent = AgentId::new("a").unwrap();
        spool
            .append(&[Envelope::new(agent.clone(), EventBody::Predict(PredictRequest { recent: vec![] }))], ferry_schema::Encoding::MsgPack)
            .unwrap();
        let health = Health::default();
        health.set("desktop", true, None);
        let mut cpu = CpuMeter::new();
        // Burn a little CPU so the meter has something to see.
        let t0 = Instant::now();
        let mut x = 0u64;
        while t0.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        assert_ne!(x, 1);
        let EventBody::Heartbeat(hb) = heartbeat(&agent, &mut cpu, spool.depth(), &health).body else { panic!() };
        assert_eq!(hb.spool_depth, 1);
        assert!(hb.oldest_unsent_ms.is_some());
        assert_eq!(hb.components.len(), 1);
        assert_eq!(hb.version, VERSION);
        #[cfg(unix)]
        {
            assert!(hb.rss_bytes > 0);
            assert!(hb.cpu_percent > 10.0, "{}", hb.cpu_percent);
        }
    }
}
