//! A TCP proxy on loopback whose every forwarded chunk can be held back for a set delay: a slow
//! network between two processes, switched on and off while a test runs.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Forwards connections on its own port to a target port, each chunk after [`SlowProxy::delay`].
pub struct SlowProxy {
    port: u16,
    target: Arc<AtomicU16>,
    delay_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowProxy {
    /// Listens on a free loopback port; connections wait for [`SlowProxy::set_target`].
    pub async fn start() -> SlowProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let target = Arc::new(AtomicU16::new(0));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (target, delay_ms) = (target.clone(), delay_ms.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let (target, delay_ms) = (target.clone(), delay_ms.clone());
                    tokio::spawn(async move {
                        let port = target.load(Ordering::SeqCst);
                        let Ok(server) = TcpStream::connect(("127.0.0.1", port)).await else {
                            return;
                        };
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        tokio::join!(
                            pump(client_read, server_write, delay_ms.clone()),
                            pump(server_read, client_write, delay_ms),
                        );
                    });
                }
            }
        });
        SlowProxy {
            port,
            target,
            delay_ms,
            task,
        }
    }

    /// The proxy's own port (advertise this one).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where new connections go.
    pub fn set_target(&self, port: u16) {
        self.target.store(port, Ordering::SeqCst);
    }

    /// Holds every chunk back this long from now on (zero: a healthy network).
    pub fn delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay_ms: Arc<AtomicU64>,
) {
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let delay = delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
