//! Endpoints: `tcp:HOST:PORT`, `unix:PATH`, `file:PATH`.
//!
//! A session is one control channel plus N data channels, each opened with a
//! [`StreamHeader`]. The listener groups channels by migration id: the control
//! channel names the session, data channels of another migration are refused.
//! Every blocking socket operation has a timeout so a stalled peer is an
//! error, never a hang. With a [`TlsConfig`] every channel is mutual TLS 1.3:
//! the handshake completes before the stream header, so a peer without a
//! certificate from the CA never gets a byte to the receiver.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::error::{CoreError, CoreResult};
use crate::wire::{ChannelKind, StreamHeader, MAX_CHANNELS, STREAM_HEADER_LEN};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
    File(PathBuf),
}

pub fn parse_uri(uri: &str) -> CoreResult<Endpoint> {
    let bad = || {
        CoreError::invalid(format!(
            "unsupported migration URI {uri:?}: use tcp:HOST:PORT, unix:PATH or file:PATH"
        ))
    };
    let (scheme, rest) = uri.split_once(':').ok_or_else(bad)?;
    if rest.is_empty() {
        return Err(bad());
    }
    match scheme {
        "tcp" => {
            let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
            port.parse::<u16>().map_err(|_| bad())?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            Ok(Endpoint::Tcp(if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            }))
        }
        "unix" => Ok(Endpoint::Unix(PathBuf::from(rest))),
        "file" => Ok(Endpoint::File(PathBuf::from(rest))),
        _ => Err(bad()),
    }
}

/// One connected socket, plain or TLS.
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// Clones share the TLS state.
    Tls(Arc<TlsConn>),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Conn::Tcp(s) => write!(f, "Tcp({s:?})"),
            Conn::Unix(s) => write!(f, "Unix({s:?})"),
            Conn::Tls(t) => write!(f, "Tls({:?})", t.sock),
        }
    }
}

impl Conn {
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tls(t) => Conn::Tls(t.clone()),
        })
    }

    /// Unblocks every reader and writer of this socket (and of its clones).
    pub fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
            Conn::Tls(t) => {
                t.sock.shutdown();
                Ok(())
            }
        };
    }

    /// The socket under any TLS layer.
    fn socket(&self) -> &Conn {
        match self {
            Conn::Tls(t) => t.sock.socket(),
            plain => plain,
        }
    }

    fn read_raw(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self.socket() {
            Conn::Tcp(s) => (&*s).read(buf),
            Conn::Unix(s) => (&*s).read(buf),
            Conn::Tls(_) => unreachable!("socket() strips TLS"),
        }
    }

    fn write_all_raw(&self, buf: &[u8]) -> io::Result<()> {
        match self.socket() {
            Conn::Tcp(s) => (&*s).write_all(buf),
            Conn::Unix(s) => (&*s).write_all(buf),
            Conn::Tls(_) => unreachable!("socket() strips TLS"),
        }
    }

    pub fn set_timeouts(&self, read: Duration, write: Duration) -> io::Result<()> {
        let (read, write) = (Some(read.max(MIN_TIMEOUT)), Some(write.max(MIN_TIMEOUT)));
        match self.socket() {
            Conn::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Conn::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Conn::Tls(_) => unreachable!("socket() strips TLS"),
        }
    }

    /// A descriptor of the plain socket that a reader may `readv` into
    /// memory directly (the receiver lands pages in guest memory so); `None`
    /// under TLS, whose bytes must be decrypted in a buffer. Reading through
    /// it and through `self` interleaves correctly because neither buffers.
    pub fn direct_fd(&self) -> io::Result<Option<std::os::fd::OwnedFd>> {
        match self {
            Conn::Tcp(s) => Ok(Some(s.as_fd().try_clone_to_owned()?)),
            Conn::Unix(s) => Ok(Some(s.as_fd().try_clone_to_owned()?)),
            Conn::Tls(_) => Ok(None),
        }
    }

    /// Waits up to `timeout` for bytes (or EOF) to read.
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        if let Conn::Tls(t) = self {
            if t.buffered() {
                return Ok(true);
            }
        }
        let fd = match self.socket() {
            Conn::Tcp(s) => s.as_fd(),
            Conn::Unix(s) => s.as_fd(),
            Conn::Tls(_) => unreachable!("socket() strips TLS"),
        };
        wait_fd(fd, timeout)
    }
}

const MIN_TIMEOUT: Duration = Duration::from_millis(1);

fn wait_fd(fd: std::os::fd::BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let ts = Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: timeout.subsec_nanos() as i64,
    };
    match poll(&mut fds, Some(&ts)) {
        Ok(n) => Ok(n > 0),
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
            Conn::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
            Conn::Tls(t) => t.write_with(|c| c.writer().write(buf)),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write_vectored(bufs),
            Conn::Unix(s) => s.write_vectored(bufs),
            Conn::Tls(t) => t.write_with(|c| c.writer().write_vectored(bufs)),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Whether an I/O error is a socket timeout.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

pub fn timeout_error(context: String) -> CoreError {
    CoreError::io(context, io::Error::from_raw_os_error(libc::ETIMEDOUT))
}

/// Reads exactly the bytes the `iov` entries describe from `fd` with
/// `readv`, straight into their memory; the error says whether the peer
/// closed, stalled, or failed.
///
/// # Safety
/// Every entry must describe memory valid for writes for as long as the
/// call runs, which no Rust reference covers (other threads may only touch
/// it through raw pointers).
pub unsafe fn readv_full(
    fd: std::os::fd::BorrowedFd<'_>,
    iov: &mut [libc::iovec],
) -> Result<(), ReadFailure> {
    use std::os::fd::AsRawFd;
    let want: usize = iov.iter().map(|v| v.iov_len).sum();
    let mut got = 0;
    let mut at = 0;
    while at < iov.len() {
        if iov[at].iov_len == 0 {
            at += 1;
            continue;
        }
        let count = (iov.len() - at).min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: the entries describe writable memory (the caller's
        // contract); the kernel writes at most their lengths.
        let n = unsafe { libc::readv(fd.as_raw_fd(), iov[at..].as_ptr(), count) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                _ if is_timeout(&e) => return Err(ReadFailure::Stalled),
                _ => return Err(ReadFailure::Io(e)),
            }
        }
        if n == 0 {
            return Err(ReadFailure::Truncated { got, want });
        }
        let mut n = n as usize;
        got += n;
        while n > 0 {
            let v = &mut iov[at];
            let step = n.min(v.iov_len);
            // SAFETY: advancing within the entry the kernel just filled.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(step) }.cast();
            v.iov_len -= step;
            n -= step;
            if v.iov_len == 0 {
                at += 1;
            }
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes; the error says whether the peer closed
/// (a truncated stream), stalled, or failed.
pub fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> Result<(), ReadFailure> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(ReadFailure::Truncated {
                    got,
                    want: buf.len(),
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(ReadFailure::Stalled),
            Err(e) => return Err(ReadFailure::Io(e)),
        }
    }
    Ok(())
}

#[derive(Debug)]
pub enum ReadFailure {
    Truncated { got: usize, want: usize },
    Stalled,
    Io(io::Error),
}

impl std::fmt::Display for ReadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadFailure::Truncated { got, want } => write!(
                f,
                "truncated stream: peer closed after {got} of {want} bytes"
            ),
            ReadFailure::Stalled => write!(f, "stalled peer: no data within the I/O timeout"),
            ReadFailure::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Connects one channel, retrying refused connections until `timeout` (the
/// destination may still be starting), runs the TLS handshake if `tls` is
/// given, and sends its stream header.
pub fn connect(
    ep: &Endpoint,
    header: &StreamHeader,
    timeout: Duration,
    io_timeout: Duration,
    tls: Option<&TlsConfig>,
) -> CoreResult<Conn> {
    let deadline = Instant::now() + timeout;
    let what = format!("connect channel {:?} {}", header.kind, header.channel_index);
    let mut conn = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = match ep {
            Endpoint::Tcp(addr) => tcp_connect(addr, left.max(MIN_TIMEOUT)).map(|s| {
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }),
            Endpoint::Unix(path) => UnixStream::connect(path).map(Conn::Unix),
            Endpoint::File(_) => {
                return Err(CoreError::invalid("file: endpoints have no sockets"));
            }
        };
        match attempt {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline && retryable(&e) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(CoreError::io(format!("{what} to {ep:?}"), e)),
        }
    };
    conn.set_timeouts(io_timeout, io_timeout)
        .map_err(|e| CoreError::io(what.clone(), e))?;
    if let Some(tls) = tls {
        let client = rustls::ClientConnection::new(tls.client.clone(), server_name(ep)?)
            .map_err(|e| CoreError::invalid(format!("TLS: {e}")))?;
        conn = TlsConn::handshake(conn, client.into())
            .map(|t| Conn::Tls(Arc::new(t)))
            .map_err(|e| {
                let hint = match e.kind() {
                    io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof => {
                        " (the destination closed the channel: is it listening without TLS?)"
                    }
                    _ => "",
                };
                CoreError::io(format!("{what}: TLS handshake with {ep:?}{hint}"), e)
            })?;
    }
    conn.write_all(&header.encode())
        .map_err(|e| CoreError::io(format!("{what}: send stream header"), e))?;
    Ok(conn)
}

fn retryable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
    )
}

fn tcp_connect(addr: &str, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{addr} did not resolve"));
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Told of every refused connection as it is refused: the peer and why.
///
/// A daemon logs each one at once; without it a refusal shows only in the
/// session's `refused` list, or in the timeout message much later.
#[derive(Clone)]
pub struct RefusalHook(pub Arc<RefusalFn>);

/// `(peer, reason)` of one refused connection.
pub type RefusalFn = dyn Fn(&str, &str) + Send + Sync;

/// What a refused connection was taken for, as the `refused` list names it.
#[derive(Clone, Copy)]
enum Refused {
    /// Refused before its stream header said what it is.
    NewChannel,
    /// A channel whose header names what it is.
    Channel,
}

impl RefusalHook {
    fn refuse(
        hook: Option<&RefusalHook>,
        refused: &mut Vec<String>,
        peer: &str,
        what: Refused,
        why: String,
    ) {
        if let Some(h) = hook {
            (h.0)(peer, &why);
        }
        let label = match what {
            Refused::NewChannel => "a new channel: ",
            Refused::Channel => "",
        };
        refused.push(format!("{label}{why} (from {peer})"));
    }
}

/// A bound endpoint waiting for a session.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
    File(PathBuf),
}

/// The channels of one accepted session.
pub struct Session {
    pub control: Conn,
    /// The control channel's peer (`HOST:PORT`, or "a peer on PATH").
    pub peer: String,
    pub data: Vec<Conn>,
    pub header: StreamHeader,
    /// Channels refused while gathering, with why.
    pub refused: Vec<String>,
}

impl Listener {
    /// Binds `uri`; returns the listener and its resolved URI (the real port
    /// for `tcp:HOST:0`).
    pub fn bind(uri: &str) -> CoreResult<(Listener, String)> {
        match parse_uri(uri)? {
            Endpoint::Tcp(addr) => {
                let l = TcpListener::bind(&addr)
                    .map_err(|e| CoreError::io(format!("bind {addr}"), e))?;
                let local = l
                    .local_addr()
                    .map_err(|e| CoreError::io("listener address", e))?;
                Ok((Listener::Tcp(l), format!("tcp:{local}")))
            }
            Endpoint::Unix(path) => {
                let l = UnixListener::bind(&path)
                    .map_err(|e| CoreError::io(format!("bind {}", path.display()), e))?;
                Ok((
                    Listener::Unix(l, path.clone()),
                    format!("unix:{}", path.display()),
                ))
            }
            Endpoint::File(path) => {
                let uri = format!("file:{}", path.display());
                Ok((Listener::File(path), uri))
            }
        }
    }

    /// The next connection and its peer's address.
    fn accept_conn(&self, timeout: Duration) -> CoreResult<Option<(Conn, String)>> {
        let ready = match self {
            Listener::Tcp(l) => wait_fd(l.as_fd(), timeout),
            Listener::Unix(l, _) => wait_fd(l.as_fd(), timeout),
            Listener::File(_) => return Err(CoreError::invalid("file: endpoints have no sockets")),
        }
        .map_err(|e| CoreError::io("poll listener", e))?;
        if !ready {
            return Ok(None);
        }
        let conn = match self {
            Listener::Tcp(l) => l.accept().map(|(s, addr)| {
                let _ = s.set_nodelay(true);
                (Conn::Tcp(s), addr.to_string())
            }),
            Listener::Unix(l, path) => l
                .accept()
                .map(|(s, _)| (Conn::Unix(s), format!("a peer on {}", path.display()))),
            Listener::File(_) => unreachable!("handled above"),
        };
        conn.map(Some).map_err(|e| CoreError::io("accept", e))
    }

    /// The next connection within `left`, its TLS handshake (with `tls`)
    /// and its stream header; or why it is refused. With the peer's name.
    #[allow(clippy::type_complexity)]
    fn accept_channel(
        &self,
        left: Duration,
        io_timeout: Duration,
        tls: Option<&TlsConfig>,
    ) -> CoreResult<Option<(Result<(Conn, StreamHeader), String>, String)>> {
        let Some((mut conn, peer)) = self.accept_conn(left)? else {
            return Ok(None);
        };
        let wait = io_timeout.min(left);
        let _ = conn.set_timeouts(wait, wait);
        if let Some(tls) = tls {
            let server = rustls::ServerConnection::new(tls.server.clone())
                .map_err(|e| CoreError::invalid(format!("TLS: {e}")))?;
            match TlsConn::handshake(conn, server.into()) {
                Ok(t) => conn = Conn::Tls(Arc::new(t)),
                Err(e) => {
                    let plain = e
                        .get_ref()
                        .and_then(|x| x.downcast_ref::<rustls::Error>())
                        .is_some_and(|x| matches!(x, rustls::Error::InvalidMessage(_)));
                    let hint = if plain {
                        " (not TLS: a source without TLS options?)"
                    } else {
                        ""
                    };
                    return Ok(Some((Err(format!("TLS handshake: {e}{hint}")), peer)));
                }
            }
        }
        let mut raw = [0u8; STREAM_HEADER_LEN];
        let header = match read_full(&mut conn, &mut raw) {
            Ok(()) => StreamHeader::decode(&raw),
            Err(e) => Err(format!("stream header: {e}")),
        };
        let _ = conn.set_timeouts(io_timeout, io_timeout);
        Ok(Some((header.map(|h| (conn, h)), peer)))
    }

    /// Gathers one control and N data channels of a single migration; with
    /// `tls`, a channel whose handshake fails is refused before its stream
    /// header is read. Each refusal goes to `on_refused` as it happens.
    pub fn accept_session(
        &self,
        timeout: Duration,
        io_timeout: Duration,
        tls: Option<&TlsConfig>,
        on_refused: Option<&RefusalHook>,
    ) -> CoreResult<Session> {
        let deadline = Instant::now() + timeout;
        let mut control: Option<(Conn, StreamHeader, String)> = None;
        let mut early: Vec<(Conn, StreamHeader, String)> = Vec::new();
        let mut data: Vec<Option<Conn>> = Vec::new();
        let mut refused = Vec::new();
        loop {
            if let Some((_, h, _)) = &control {
                for (c, dh, peer) in std::mem::take(&mut early) {
                    if let Err(why) = place(h, &mut data, c, &dh) {
                        RefusalHook::refuse(on_refused, &mut refused, &peer, Refused::Channel, why);
                    }
                }
                if data.iter().all(Option::is_some) {
                    let (control, header, peer) = control.take().expect("checked above");
                    return Ok(Session {
                        control,
                        peer,
                        data: data.into_iter().flatten().collect(),
                        header,
                        refused,
                    });
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let have = data.iter().filter(|c| c.is_some()).count();
                return Err(timeout_error(format!(
                    "no complete migration session within {timeout:?}: control channel {}, \
                     {have}/{} data channels{}",
                    if control.is_some() {
                        "connected"
                    } else {
                        "missing"
                    },
                    data.len(),
                    if refused.is_empty() {
                        String::new()
                    } else {
                        format!("; refused: {}", refused.join("; "))
                    }
                )));
            }
            let Some((got, peer)) = self.accept_channel(left, io_timeout, tls)? else {
                continue;
            };
            let (conn, header) = match got {
                Ok(ch) => ch,
                Err(why) => {
                    RefusalHook::refuse(on_refused, &mut refused, &peer, Refused::NewChannel, why);
                    continue;
                }
            };
            match (header.kind, &control) {
                (ChannelKind::Control, None) => {
                    data = (0..header.channel_count).map(|_| None).collect();
                    control = Some((conn, header, peer));
                }
                (ChannelKind::Control, Some((_, h, _))) => RefusalHook::refuse(
                    on_refused,
                    &mut refused,
                    &peer,
                    Refused::Channel,
                    format!(
                        "a second control channel of migration {:032x} (session {:032x})",
                        header.migration_id, h.migration_id
                    ),
                ),
                (ChannelKind::Data, Some((_, h, _))) => {
                    if let Err(why) = place(h, &mut data, conn, &header) {
                        RefusalHook::refuse(on_refused, &mut refused, &peer, Refused::Channel, why);
                    }
                }
                (ChannelKind::Data, None) if early.len() < MAX_CHANNELS as usize => {
                    early.push((conn, header, peer))
                }
                (kind, _) => RefusalHook::refuse(
                    on_refused,
                    &mut refused,
                    &peer,
                    Refused::Channel,
                    format!(
                        "channel {} of kind {kind:?} (unexpected here)",
                        header.channel_index
                    ),
                ),
            }
        }
    }
}

impl Listener {
    /// Accepts the `count` channels of `kind` that migration `migration_id`
    /// opens after its session (post-copy's page channels), in index order.
    /// Anything else is refused and closed, its reason kept for the error.
    pub fn accept_channels(
        &self,
        kind: ChannelKind,
        migration_id: u128,
        count: usize,
        timeout: Duration,
        io_timeout: Duration,
        tls: Option<&TlsConfig>,
    ) -> CoreResult<Vec<Conn>> {
        let deadline = Instant::now() + timeout;
        let mut got: Vec<Option<Conn>> = (0..count).map(|_| None).collect();
        let mut refused = Vec::new();
        while got.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timeout_error(format!(
                    "{}/{count} {kind:?} channels of migration {migration_id:032x} within \
                     {timeout:?}{}",
                    got.iter().filter(|c| c.is_some()).count(),
                    if refused.is_empty() {
                        String::new()
                    } else {
                        format!("; refused: {}", refused.join("; "))
                    }
                )));
            }
            let Some((ch, peer)) = self.accept_channel(left, io_timeout, tls)? else {
                continue;
            };
            match ch {
                Ok((conn, h))
                    if h.kind == kind
                        && h.migration_id == migration_id
                        && (h.channel_index as usize) < count
                        && got[h.channel_index as usize].is_none() =>
                {
                    got[h.channel_index as usize] = Some(conn);
                }
                Ok((conn, h)) => {
                    conn.shutdown();
                    refused.push(format!(
                        "channel {} of kind {:?} of migration {:032x} (from {peer})",
                        h.channel_index, h.kind, h.migration_id
                    ));
                }
                Err(why) => refused.push(format!("{why} (from {peer})")),
            }
        }
        Ok(got.into_iter().flatten().collect())
    }
}

/// Slots a data channel into its session, or closes it and says why not.
fn place(
    session: &StreamHeader,
    data: &mut [Option<Conn>],
    conn: Conn,
    h: &StreamHeader,
) -> Result<(), String> {
    let why = if h.migration_id != session.migration_id {
        format!(
            "data channel {} of migration {:032x} (session is {:032x})",
            h.channel_index, h.migration_id, session.migration_id
        )
    } else if (h.channel_count, h.page_size, h.memory_size, h.packet_pages)
        != (
            session.channel_count,
            session.page_size,
            session.memory_size,
            session.packet_pages,
        )
    {
        format!(
            "data channel {} disagrees with the control channel's geometry",
            h.channel_index
        )
    } else if data[h.channel_index as usize].is_some() {
        format!("duplicate data channel {}", h.channel_index)
    } else {
        data[h.channel_index as usize] = Some(conn);
        return Ok(());
    };
    conn.shutdown();
    Err(why)
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The control channel: length-prefixed frames for the orchestrator's
/// messages. Reads and writes lock separately so one thread may wait for a
/// message while another sends.
pub struct ControlLink {
    reader: std::sync::Mutex<(Conn, u64)>,
    writer: std::sync::Mutex<Conn>,
}

fn control_error(frame: u64, msg: impl std::fmt::Display) -> CoreError {
    CoreError::io(
        format!("control channel, frame {frame}: {msg}"),
        io::Error::from_raw_os_error(libc::EBADMSG),
    )
}

/// A read of a control frame that failed: the transport's own error keeps
/// its errno (a peer that reset the connection closed it, it did not send
/// a corrupt frame), a stalled peer is a timeout, and a frame cut short is
/// a malformed frame.
fn control_read_error(frame: u64, e: ReadFailure) -> CoreError {
    match e {
        ReadFailure::Io(e) => CoreError::io(format!("control channel, frame {frame}"), e),
        ReadFailure::Stalled => CoreError::io(
            format!("control channel, frame {frame}: {e}"),
            io::Error::from_raw_os_error(libc::ETIMEDOUT),
        ),
        e @ ReadFailure::Truncated { .. } => control_error(frame, e),
    }
}

impl ControlLink {
    pub fn new(conn: Conn) -> CoreResult<Self> {
        let writer = conn
            .try_clone()
            .map_err(|e| CoreError::io("clone control channel", e))?;
        Ok(ControlLink {
            reader: std::sync::Mutex::new((conn, 0)),
            writer: std::sync::Mutex::new(writer),
        })
    }

    pub fn send(&self, payload: &[u8]) -> CoreResult<()> {
        let frame = crate::wire::control_frame(payload)?;
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        w.write_all(&frame)
            .map_err(|e| CoreError::io("control channel: send", e))
    }

    /// The next message, or `None` if none starts within `timeout`.
    pub fn recv(&self, timeout: Duration) -> CoreResult<Option<Vec<u8>>> {
        let mut guard = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let (conn, frames) = &mut *guard;
        if !conn
            .wait_readable(timeout)
            .map_err(|e| CoreError::io("control channel: poll", e))?
        {
            return Ok(None);
        }
        let mut head = [0u8; crate::wire::CONTROL_FRAME_HEADER_LEN];
        match read_full(conn, &mut head) {
            Ok(()) => {}
            Err(ReadFailure::Truncated { got: 0, .. }) => {
                return Err(control_error(*frames, "closed by peer"))
            }
            Err(e) => return Err(control_read_error(*frames, e)),
        }
        let (len, crc) =
            crate::wire::control_frame_header(&head).map_err(|m| control_error(*frames, m))?;
        let mut payload = vec![0u8; len];
        read_full(conn, &mut payload).map_err(|e| control_read_error(*frames, e))?;
        if crc32c::crc32c(&payload) != crc {
            return Err(control_error(*frames, "CRC mismatch"));
        }
        *frames += 1;
        Ok(Some(payload))
    }

    pub fn shutdown(&self) {
        self.writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown();
    }
}

/// Mutual TLS 1.3 for every channel (rustls, ring provider). Both sides
/// present a certificate and verify the peer's against the same CA; the
/// source also checks the destination's name (the URI's host, `localhost`
/// for `unix:`).
pub struct TlsConfig {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig")
    }
}

impl TlsConfig {
    /// Loads a PEM certificate chain, its private key and the CA bundle that
    /// peers must chain to.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> CoreResult<Arc<TlsConfig>> {
        let bad = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
            CoreError::invalid(format!("TLS {what} {}: {e}", path.display()))
        };
        let pem_certs = |what: &str, path: &Path| -> CoreResult<Vec<CertificateDer<'static>>> {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| bad(what, path, &e))?;
            if certs.is_empty() {
                return Err(bad(what, path, &"no CERTIFICATE block"));
            }
            Ok(certs)
        };
        let chain = pem_certs("certificate file", cert)?;
        let private = PrivateKeyDer::from_pem_file(key).map_err(|e| bad("key file", key, &e))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in pem_certs("CA file", ca)? {
            roots.add(c).map_err(|e| bad("CA file", ca, &e))?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        let setup = |e: rustls::Error| CoreError::invalid(format!("TLS setup: {e}"));
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| CoreError::invalid(format!("TLS CA file {}: {e}", ca.display())))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(tls13)
            .map_err(setup)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), private.clone_key())
            .map_err(|e| bad("certificate/key pair", cert, &e))?;
        // Exactly the one ticket the source waits for: data channels are
        // never read afterwards, and unread bytes would turn the source's
        // close into a reset that can discard the destination's last bytes.
        server.send_tls13_tickets = 1;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(tls13)
            .map_err(setup)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, private)
            .map_err(|e| bad("certificate/key pair", cert, &e))?;
        Ok(Arc::new(TlsConfig {
            client: Arc::new(client),
            server: Arc::new(server),
        }))
    }
}

/// The name the source expects in the destination's certificate.
fn server_name(ep: &Endpoint) -> CoreResult<ServerName<'static>> {
    let host = match ep {
        Endpoint::Tcp(addr) => addr
            .rsplit_once(':')
            .map_or(addr.as_str(), |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']'),
        _ => "localhost",
    };
    ServerName::try_from(host.to_string())
        .map_err(|e| CoreError::invalid(format!("TLS: {host:?} is not a valid server name: {e}")))
}

fn tls_io(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

/// Ciphertext read from the socket and not yet handed to rustls.
struct Inbound {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// One TLS channel shared by a reading and a writing thread (the control
/// channel does both at once): socket reads and writes happen outside the
/// TLS state's lock, so a reader waiting for bytes never blocks a writer.
pub struct TlsConn {
    sock: Conn,
    tls: Mutex<rustls::Connection>,
    rx: Mutex<Inbound>,
    tx: Mutex<Vec<u8>>,
}

const TLS_READ_CHUNK: usize = 64 << 10;

impl TlsConn {
    /// Runs the handshake on a fresh socket (its timeouts bound every step).
    /// The source waits for the destination's first session ticket, which
    /// TLS 1.3 sends only after it accepted the source's certificate, so a
    /// refused certificate fails here rather than at the first write.
    fn handshake(mut sock: Conn, mut tls: rustls::Connection) -> io::Result<TlsConn> {
        while tls.is_handshaking() {
            tls.complete_io(&mut sock)?;
        }
        while tls.wants_write() {
            tls.write_tls(&mut sock)?;
        }
        if let rustls::Connection::Client(c) = &mut tls {
            while c.tls13_tickets_received() == 0 {
                if c.read_tls(&mut sock)? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the destination closed the connection after the TLS handshake",
                    ));
                }
                c.process_new_packets().map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("the destination refused this side's certificate: {e}"),
                    )
                })?;
            }
        }
        Ok(TlsConn {
            sock,
            tls: Mutex::new(tls),
            rx: Mutex::new(Inbound {
                buf: vec![0u8; TLS_READ_CHUNK],
                start: 0,
                end: 0,
            }),
            tx: Mutex::new(Vec::new()),
        })
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut rx = lock(&self.rx);
        let rx = &mut *rx;
        loop {
            {
                let mut tls = lock(&self.tls);
                loop {
                    match tls.reader().read(buf) {
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        // Closed without close_notify: a truncated stream.
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                        Err(e) => return Err(e),
                    }
                    if rx.start == rx.end {
                        break;
                    }
                    let n = tls.read_tls(&mut &rx.buf[rx.start..rx.end])?;
                    rx.start += n;
                    tls.process_new_packets().map_err(tls_io)?;
                }
            }
            let n = self.sock.read_raw(&mut rx.buf)?;
            (rx.start, rx.end) = (0, n);
            if n == 0 {
                let mut tls = lock(&self.tls);
                tls.read_tls(&mut io::empty())?;
                tls.process_new_packets().map_err(tls_io)?;
                return match tls.reader().read(buf) {
                    Ok(n) => Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::Other => Err(e),
                    Err(_) => Ok(0),
                };
            }
        }
    }

    fn write_with(
        &self,
        put: impl FnOnce(&mut rustls::Connection) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let mut tx = lock(&self.tx);
        tx.clear();
        let n = {
            let mut tls = lock(&self.tls);
            let n = put(&mut tls)?;
            while tls.wants_write() {
                tls.write_tls(&mut *tx)?;
            }
            n
        };
        self.sock.write_all_raw(&tx)?;
        Ok(n)
    }

    /// Whether a read would return without waiting for the socket.
    fn buffered(&self) -> bool {
        let rx = lock(&self.rx);
        if rx.start < rx.end {
            return true;
        }
        lock(&self.tls).process_new_packets().map_or(true, |s| {
            s.plaintext_bytes_to_read() > 0 || s.peer_has_closed()
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes every byte of `bufs` with vectored writes.
pub fn write_all_vectored(w: &mut dyn Write, mut bufs: &mut [io::IoSlice<'_>]) -> io::Result<()> {
    io::IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse() {
        assert_eq!(
            parse_uri("tcp:127.0.0.1:0").unwrap(),
            Endpoint::Tcp("127.0.0.1:0".into())
        );
        assert_eq!(
            parse_uri("tcp:[::1]:80").unwrap(),
            Endpoint::Tcp("[::1]:80".into())
        );
        assert_eq!(
            parse_uri("unix:/tmp/x").unwrap(),
            Endpoint::Unix("/tmp/x".into())
        );
        assert!(parse_uri("tcp:host").is_err());
        assert!(parse_uri("rdma:x").is_err());
        assert!(parse_uri("file:").is_err());
    }
}
