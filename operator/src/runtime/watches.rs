//! The controllers' watches, kept live through API-server restarts, freezes and broken connections.
//!
//! kube's watcher resumes a watch that ends or fails, with a backoff of up to 30 s; a watch whose connection
//! stalled (the server went away and nothing told the client) is noticed only by its idle timeout, 295 s by
//! default. A security operator must see drift again within seconds, so here:
//! - [`watch_contact`] asks the API server for `/version` every [`CONTACT_EVERY`] (every second while it does not
//!   answer) and, when it answers again after it did not, starts every watch over: a fresh list, then a watch on
//!   new connections, whatever state the old ones were in;
//! - the server ends every watch after [`WATCH_TIMEOUT_SECONDS`] and the client gives up on one that stays silent
//!   5 s longer, so a connection that died alone is replaced within about a minute even when `/version` answers;
//! - failed watches are retried after at most [`MAX_BACKOFF`] (jittered), not 30 s.

use std::any::TypeId;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::api::Api;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;

use super::http::Health;

/// How often the API server is probed (`GET /version`, with a deadline of the same length).
pub const CONTACT_EVERY: Duration = Duration::from_secs(5);
/// How often it is probed while it does not answer, so that recovery is seen within a second.
pub const CONTACT_RETRY: Duration = Duration::from_secs(1);
/// The server ends each watch after this long (`timeoutSeconds`); the watch is then resumed where it was.
pub const WATCH_TIMEOUT_SECONDS: u32 = 60;
/// The longest wait before a failed watch is tried again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Counts the API-server outages that ended; every watch starts over when it changes.
#[derive(Clone, Debug)]
pub struct Restarts(watch::Receiver<u64>);

impl Restarts {
    /// A counter and the receiver end every watch listens to.
    pub fn channel() -> (watch::Sender<u64>, Restarts) {
        let (tx, rx) = watch::channel(0);
        (tx, Restarts(rx))
    }
}

/// Probes the API server every [`CONTACT_EVERY`] and records each answer in `health` (readiness reflects an
/// outage; liveness does not). When it answers after one or more probes it did not, bumps `ended`: an outage
/// (restart, freeze, lost connection) ended and every watch starts over.
pub async fn watch_contact(client: kube::Client, health: Arc<Health>, ended: watch::Sender<u64>) {
    let mut down_since: Option<jiff::Timestamp> = None;
    loop {
        let answered = matches!(tokio::time::timeout(CONTACT_EVERY, client.apiserver_version()).await, Ok(Ok(_)));
        let now = jiff::Timestamp::now();
        match (answered, down_since) {
            (true, None) => {}
            (true, Some(since)) => {
                tracing::info!(
                    outage_seconds = (now - since).get_seconds(),
                    "the API server answers again; every watch starts over (list, then watch)"
                );
                ended.send_modify(|n| *n += 1);
                down_since = None;
            }
            (false, None) => {
                tracing::warn!(deadline_seconds = CONTACT_EVERY.as_secs(), "the API server did not answer /version");
                down_since = Some(now);
            }
            (false, Some(_)) => {}
        }
        if answered {
            health.last_contact.store(now.as_second(), Ordering::Relaxed);
        }
        tokio::time::sleep(if answered { CONTACT_EVERY } else { CONTACT_RETRY }).await;
    }
}

/// Objects per page of a watch's (re-)list.
pub const LIST_PAGE: u32 = 500;

/// `cfg` with the bounded watch timeout of this module, and lists in pages of [`LIST_PAGE`] at the most recent
/// resourceVersion. A list at `resourceVersion=0` ("any") would be served from the API server's watch cache too, but
/// the cache ignores `limit` for it (`computeListLimit` in k8s.io/apiserver's cacher): every object of the kind
/// would arrive in one response, buffered whole and then parsed whole, the operator's largest allocation by far at
/// 10,000 resources. A most-recent list is a consistent read, served from the watch cache since Kubernetes 1.31
/// (ConsistentListFromCache), its later pages too since 1.34 (ListFromCacheSnapshot).
pub fn bounded(cfg: watcher::Config) -> watcher::Config {
    cfg.timeout(WATCH_TIMEOUT_SECONDS).list_semantic(watcher::ListSemantic::MostRecent).page_size(LIST_PAGE)
}

/// kube's watcher over `api`, started over (dropped, then listed and watched anew) whenever `restarts` changes.
pub fn events<K>(
    api: Api<K>,
    cfg: watcher::Config,
    restarts: &Restarts,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static + use<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let cfg = bounded(cfg);
    let start = move || watcher::watcher(api.clone(), cfg.clone()).boxed();
    let mut rx = restarts.0.clone();
    rx.mark_unchanged();
    futures::stream::unfold((start(), rx, start), |(mut inner, mut rx, start)| async move {
        tokio::select! {
            biased;
            Ok(()) = rx.changed() => {
                inner = start();
                Some((None, (inner, rx, start)))
            }
            event = inner.next() => event.map(|e| (Some(e), (inner, rx, start))),
        }
    })
    .filter_map(futures::future::ready)
}

/// One watch per kind and scope, whichever controllers watch the kind: the first to ask leads (its stream is the
/// watch, and feeds the cache), every later one follows (it receives each event once the leader's stream has
/// passed it on, so after the cache has it). Two watches of one kind would each trigger reconciles whose reads of
/// the cache may come before the other watch brought the change. Followers subscribe while the controllers are
/// built, before any stream is polled.
///
/// It also passes on, from each controller's own watch, its resources that changed, came or went (a re-list's
/// differences once it is complete), to the controllers that asked for them ([`Fanout::shown_by`]).
#[derive(Default)]
pub struct Fanout {
    watches: std::sync::Mutex<std::collections::HashMap<WatchKey, Followers>>,
    shown: std::sync::Mutex<std::collections::HashMap<(&'static str, Option<String>), Shown>>,
}

/// Those who asked for the (namespace, name) of one controller's resources that changed or went.
pub type Shown = Arc<std::sync::Mutex<Vec<futures::channel::mpsc::UnboundedSender<(String, String)>>>>;

impl std::fmt::Debug for Fanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fanout")
    }
}

/// (kind, scope, the type its objects arrive as).
type WatchKey = (&'static str, Option<String>, TypeId);
type Followers = Box<dyn std::any::Any + Send>;
type Senders<O> = Arc<std::sync::Mutex<Vec<futures::channel::mpsc::UnboundedSender<Event<O>>>>>;

/// How a controller gets the events of a shared watch.
#[allow(missing_debug_implementations)] // channel ends
pub enum Subscription<O> {
    /// Runs the watch, and passes each event on to these followers.
    Lead(Senders<O>),
    Follow(futures::channel::mpsc::UnboundedReceiver<Event<O>>),
}

impl Fanout {
    /// Subscribes to the watch of `kind` (as `O`) in `scope`.
    pub fn subscribe<O: Send + 'static>(&self, kind: &'static str, scope: Option<&str>) -> Subscription<O> {
        let mut m = self.watches.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (kind, scope.map(str::to_string), TypeId::of::<O>());
        if let Some(senders) = m.get(&key).and_then(|f| f.downcast_ref::<Senders<O>>()) {
            let (tx, rx) = futures::channel::mpsc::unbounded();
            senders.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(tx);
            return Subscription::Follow(rx);
        }
        let senders: Senders<O> = Arc::default();
        m.insert(key, Box::new(senders.clone()));
        Subscription::Lead(senders)
    }

    /// Where the controller `controller` of `scope` passes on its resources that changed or went.
    pub fn shown(&self, controller: &'static str, scope: Option<&str>) -> Shown {
        let mut m = self.shown.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.entry((controller, scope.map(str::to_string))).or_default().clone()
    }

    /// The (namespace, name) of the resources that changed or went of the controller `controller` of `scope`, once
    /// its watch (and store) has them.
    pub fn shown_by(
        &self,
        controller: &'static str,
        scope: Option<&str>,
    ) -> futures::channel::mpsc::UnboundedReceiver<(String, String)> {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        self.shown(controller, scope).lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(tx);
        rx
    }
}

/// Passes a resource (namespace, name) on to those who asked (a receiver dropped is left out).
pub fn pass_on(shown: &Shown, namespace: &str, name: &str) {
    let mut receivers = shown.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    receivers.retain(|tx| tx.unbounded_send((namespace.to_string(), name.to_string())).is_ok());
}

/// `events` (a leader's watch), each event passed on to the followers before it goes on.
pub fn lead<O, S>(
    events: S,
    followers: Senders<O>,
) -> impl Stream<Item = Result<Event<O>, watcher::Error>> + Send + 'static + use<O, S>
where
    O: Clone + Send + 'static,
    S: Stream<Item = Result<Event<O>, watcher::Error>> + Send + 'static,
{
    events.inspect(move |e| {
        if let Ok(e) = e {
            for f in followers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter() {
                let _ = f.unbounded_send(e.clone());
            }
        }
    })
}

/// Retry delays for failed watches: doubling from 250 ms up to [`MAX_BACKOFF`], each with up to 50 % less at
/// random so that replicas and kinds do not retry in step; back to the start after 60 s without a failure.
#[derive(Debug)]
pub struct WatchBackoff {
    next: Duration,
    last: Option<std::time::Instant>,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff { next: Duration::from_millis(250), last: None }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = std::time::Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) > Duration::from_secs(60)) {
            *self = WatchBackoff::default();
        }
        self.last = Some(now);
        let delay = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        // Jitter from the clock's nanoseconds: no randomness source is needed for spreading retries.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        Some(delay.mul_f64(1.0 - f64::from(nanos % 500) / 1000.0))
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        *self = WatchBackoff::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_retries_double_up_to_the_cap_with_jitter_below_the_nominal_delay() {
        let mut b = WatchBackoff::default();
        let delays: Vec<Duration> = (0..8).map(|_| b.next().unwrap_or_default()).collect();
        let nominal = [250, 500, 1000, 2000, 4000, 5000, 5000, 5000];
        for (d, n) in delays.iter().zip(nominal) {
            let n = Duration::from_millis(n);
            assert!(*d <= n && *d > n / 2, "{d:?} vs nominal {n:?}");
        }
        b.reset();
        assert!(b.next().unwrap_or_default() <= Duration::from_millis(250));
    }
}
