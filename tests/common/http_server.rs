//! A small HTTP/1.1 file server for tests, on 127.0.0.1 in a background thread.
//!
//! It serves in-memory files under fixed paths with `GET`, honours `Range: bytes=N-` (206,
//! or 416 past the end) unless told to ignore it, answers 404 for unknown paths, can cut the
//! next response to a path after K body bytes, and records every request. Each connection
//! gets one response and `Connection: close`, so the server handles connections one at a
//! time. It is bounded: it stops when dropped, and by itself after two minutes.
#![allow(dead_code)] // each test crate uses a different subset

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a server lives at most, so that a stuck test cannot keep it alive.
const LIFETIME: Duration = Duration::from_secs(120);

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request method, e.g. `GET`.
    pub method: String,
    /// The request target, e.g. `/models/x.pth`.
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
}

#[derive(Default)]
struct State {
    files: HashMap<String, Vec<u8>>,
    /// Path → number of body bytes after which the next response to it is cut.
    cut_next: HashMap<String, usize>,
    ignore_range: bool,
    requests: Vec<Request>,
}

/// The running server; stops when dropped.
pub struct TestServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server with no files on an ephemeral port of 127.0.0.1.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("local address");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let state = Arc::clone(&state);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || serve(listener, state, stop))
        };
        Self {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// Base URL, e.g. `http://127.0.0.1:40123` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves `body` at `path` (which starts with `/`).
    pub fn serve(&self, path: &str, body: Vec<u8>) {
        self.state().files.insert(path.to_owned(), body);
    }

    /// Cuts the next response to `path` after `after` body bytes (the headers still
    /// announce the full length), then closes the connection.
    pub fn cut_next(&self, path: &str, after: usize) {
        self.state().cut_next.insert(path.to_owned(), after);
    }

    /// Makes the server ignore `Range` headers and always answer 200 with the whole file.
    pub fn ignore_range(&self, ignore: bool) {
        self.state().ignore_range = ignore;
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.state().requests.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An address on 127.0.0.1 where nothing listens (bound, then released).
pub fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local address");
    drop(listener);
    format!("http://{addr}")
}

fn serve(listener: TcpListener, state: Arc<Mutex<State>>, stop: Arc<AtomicBool>) {
    let born = Instant::now();
    while !stop.load(Ordering::SeqCst) && born.elapsed() < LIFETIME {
        match listener.accept() {
            Ok((stream, _)) => {
                // A failed exchange (client gone) only ends that connection.
                let _ = handle(stream, &state);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
}

fn handle(mut stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;

    // Read the request head (no request bodies are expected).
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split_whitespace();
    let method = first.next().unwrap_or_default().to_owned();
    let path = first.next().unwrap_or_default().to_owned();
    let range = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("range"))
        .map(|(_, value)| value.trim().to_owned());

    let (body, cut, ignore_range) = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.requests.push(Request {
            method: method.clone(),
            path: path.clone(),
            range: range.clone(),
        });
        let cut = s.cut_next.remove(&path);
        (s.files.get(&path).cloned(), cut, s.ignore_range)
    };

    let Some(body) = body.filter(|_| method == "GET") else {
        let msg = b"not found\n";
        write!(
            stream,
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            msg.len()
        )?;
        stream.write_all(msg)?;
        return stream.flush();
    };

    let start = range
        .as_deref()
        .filter(|_| !ignore_range)
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    let len = body.len();
    let (status, extra, slice) = match start {
        Some(n) if n >= len => {
            write!(
                stream,
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            return stream.flush();
        }
        Some(n) => (
            "206 Partial Content",
            format!("Content-Range: bytes {n}-{}/{len}\r\n", len - 1),
            &body[n..],
        ),
        None => ("200 OK", String::new(), &body[..]),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\n{extra}\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        slice.len()
    )?;
    match cut {
        Some(k) => {
            stream.write_all(&slice[..k.min(slice.len())])?;
            stream.flush()?;
            stream.shutdown(Shutdown::Both)?;
        }
        None => {
            stream.write_all(slice)?;
            stream.flush()?;
        }
    }
    Ok(())
}
