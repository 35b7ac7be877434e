//! A TCP forwarder on loopback that goes away mid-transfer: once a given number of bytes has passed in one
//! direction, every connection is cut and new ones are refused, for good (an endpoint that died) or for a while
//! (an endpoint that restarts). Stops when dropped.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// When and for how long the endpoint goes away.
#[derive(Clone, Copy, Debug)]
pub struct Outage {
    /// Bytes that pass before the cut.
    pub after_bytes: u64,
    /// Count what the client sends (an upload) instead of what the server sends (a download).
    pub count_client_bytes: bool,
    /// How long new connections are refused after the cut; `None`: for good.
    pub down: Option<Duration>,
}

/// A running forwarder.
#[derive(Debug)]
pub struct CutProxy {
    pub port: u16,
    state: Arc<State>,
}

#[derive(Debug)]
struct State {
    outage: Outage,
    counted: AtomicU64,
    cut: AtomicBool,
    cut_at: Mutex<Option<Instant>>,
    stopped: AtomicBool,
    open: Mutex<Vec<TcpStream>>,
}

impl State {
    fn cut_all(&self) {
        if !self.cut.swap(true, Ordering::SeqCst) {
            *self.cut_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
        }
        for s in self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Whether new connections are refused now.
    fn down(&self) -> bool {
        let at = *self.cut_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match (at, self.outage.down) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(at), Some(d)) => at.elapsed() < d,
        }
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        self.state.cut_all();
    }
}

impl CutProxy {
    /// Forwards to `127.0.0.1:target` until the server has sent `cut_after` bytes, then is gone for good.
    pub fn start(target: u16, cut_after: u64) -> CutProxy {
        CutProxy::with_outage(target, Outage { after_bytes: cut_after, count_client_bytes: false, down: None })
    }

    /// Forwards to `127.0.0.1:target` with the given outage (once).
    pub fn with_outage(target: u16, outage: Outage) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let state = Arc::new(State {
            outage,
            counted: AtomicU64::new(0),
            cut: AtomicBool::new(false),
            cut_at: Mutex::new(None),
            stopped: AtomicBool::new(false),
            open: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        std::thread::spawn(move || {
            while !st.stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    // While down, a connection is closed as soon as it is accepted (refused, to the client).
                    Ok((client, _)) if st.down() => drop(client),
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                        let mut open = st.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        for s in [&client, &server] {
                            if let Ok(c) = s.try_clone() {
                                open.push(c);
                            }
                        }
                        drop(open);
                        let (up, down) = (st.outage.count_client_bytes, !st.outage.count_client_bytes);
                        pump(client.try_clone().ok(), server.try_clone().ok(), up.then(|| st.clone()));
                        pump(Some(server), Some(client), down.then(|| st.clone()));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => break,
                }
            }
        });
        CutProxy { port, state }
    }

    /// Whether the cut has happened.
    pub fn was_cut(&self) -> bool {
        self.state.cut.load(Ordering::SeqCst)
    }
}

/// Copies `from` to `to` on a thread; bytes are counted when `counted` is given, and the count triggers the cut
/// (once).
fn pump(from: Option<TcpStream>, to: Option<TcpStream>, counted: Option<Arc<State>>) {
    let (Some(mut from), Some(mut to)) = (from, to) else { return };
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(st) = &counted
                && !st.cut.load(Ordering::SeqCst)
            {
                let limit = st.outage.after_bytes;
                let before = st.counted.fetch_add(n as u64, Ordering::SeqCst);
                if before + n as u64 >= limit {
                    // Deliver up to the cut, then everything goes away.
                    n = limit.saturating_sub(before) as usize;
                    let _ = to.write_all(&buf[..n]);
                    st.cut_all();
                    break;
                }
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
