//! A TCP forwarder on loopback that can go away mid-transfer: once the server has sent a given number of bytes
//! through it, every connection is cut and new ones are refused, as when a storage endpoint dies during a
//! download. Stops when dropped.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running forwarder.
#[derive(Debug)]
pub struct CutProxy {
    pub port: u16,
    state: Arc<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Bytes the server sent so far.
    from_server: AtomicU64,
    cut: AtomicBool,
    open: Mutex<Vec<TcpStream>>,
}

impl State {
    fn cut_all(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.state.cut_all();
    }
}

impl CutProxy {
    /// Forwards to `127.0.0.1:target` until the server has sent `cut_after` bytes.
    pub fn start(target: u16, cut_after: u64) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let state = Arc::new(State::default());
        let st = state.clone();
        std::thread::spawn(move || {
            // Dropping the listener once cut refuses new connections.
            while !st.cut.load(Ordering::SeqCst) {
                match listener.accept() {
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
                        pump(client.try_clone().ok(), server.try_clone().ok(), None, cut_after);
                        pump(Some(server), Some(client), Some(st.clone()), cut_after);
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

/// Copies `from` to `to` on a thread; bytes from the server are counted, and the count may trigger the cut.
fn pump(from: Option<TcpStream>, to: Option<TcpStream>, counted: Option<Arc<State>>, cut_after: u64) {
    let (Some(mut from), Some(mut to)) = (from, to) else { return };
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut n = n;
            if let Some(st) = &counted {
                let before = st.from_server.fetch_add(n as u64, Ordering::SeqCst);
                if before + n as u64 >= cut_after {
                    // Deliver up to the cut, then everything goes away.
                    n = cut_after.saturating_sub(before) as usize;
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
