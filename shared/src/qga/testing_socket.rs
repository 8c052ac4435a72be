//! The skeleton of the test servers ([`FakeAgent`](super::testing::FakeAgent),
//! [`HybridDevice`](super::testing_hybrid::HybridDevice)): a Unix socket in its own
//! temporary folder and a thread that accepts on it until the server is dropped.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A listening socket served by its own thread; stops the thread and removes the folder
/// when dropped.
#[derive(Debug)]
pub(super) struct SocketServer {
    /// The socket, `<tmp>/evesnap-<kind>-<pid>-<n>/<file>`.
    pub(super) path: PathBuf,
    dir: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SocketServer {
    /// Binds a fresh socket and hands each connection, on the server's thread, to
    /// `accept` with the stop flag (set when the server is dropped, for connections that
    /// would otherwise outlive it).
    pub(super) fn start(
        kind: &str,
        file: &str,
        mut accept: impl FnMut(UnixStream, &Arc<AtomicBool>) + Send + 'static,
    ) -> SocketServer {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "evesnap-{kind}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("create the test server's folder {}: {e}", dir.display()));
        let path = dir.join(file);
        let listener = UnixListener::bind(&path)
            .unwrap_or_else(|e| panic!("bind the test server's socket {}: {e}", path.display()));
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => accept(stream, &stop),
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        SocketServer {
            path,
            dir,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for SocketServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
