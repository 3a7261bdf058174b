//! A real SMTP server on 127.0.0.1: the `mailin` crate's SMTP state machine over tokio TCP. It
//! accepts every email (or refuses the first recipients as a test scripts it); tests read what it
//! caught, and `dev` runs one so that emails have somewhere to go, keeping the last ones as files.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::{IoContext as _, Result};

/// How long the catcher waits after failing to accept a connection.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// Tells apart files kept within the same microsecond.
static KEPT: AtomicUsize = AtomicUsize::new(0);

/// One email the [`MailCatcher`] accepted.
#[derive(Debug, Clone)]
pub struct CaughtMail {
    /// The envelope's sender (`MAIL FROM`).
    pub from: String,
    /// The envelope's recipients (`RCPT TO`).
    pub to: Vec<String>,
    /// Its `Subject` header.
    pub subject: String,
    /// Its `Message-ID` header.
    pub message_id: String,
    /// The first non-empty line of its text.
    pub first_line: String,
    /// The whole message, headers and body, as sent.
    pub data: String,
    /// The file it was kept in, when the catcher keeps mail.
    pub file: Option<PathBuf>,
    /// When the server accepted it, on the monotonic clock (to order and time events).
    pub at: Instant,
    /// The same moment on the wall clock, to compare with a database's times.
    pub wall: SystemTime,
}

/// Where a [`MailCatcher`] keeps the emails it accepts, one `.eml` file each.
#[derive(Debug, Clone)]
pub struct MailDir {
    /// The directory (created if missing).
    pub dir: PathBuf,
    /// How many of the newest files stay; older ones are removed as new ones arrive.
    pub keep: usize,
}

/// How the catcher answers a `RCPT TO` it is told to refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RcptRefusal {
    /// 451: a transient failure, try again later.
    TryLater,
    /// 550: no such mailbox, a permanent failure.
    NoMailbox,
}

/// What a [`MailCatcher`] is started with.
#[derive(Debug, Clone, Default)]
pub struct MailOptions {
    /// The port on 127.0.0.1 (0: a free one).
    pub port: u16,
    /// Where to keep each email as a file, if anywhere.
    pub keep: Option<MailDir>,
    /// The answers to the first `RCPT TO` commands, in order; every later one is accepted.
    pub refuse_rcpt: Vec<RcptRefusal>,
    /// Keep nothing in memory ([`MailCatcher::caught`] and [`MailCatcher::next`] see nothing): for
    /// a long-running catcher whose emails are only logged and kept as files.
    pub forget: bool,
}

/// An SMTP server on `127.0.0.1` that accepts every email. Dropping it stops the server.
#[derive(Debug)]
pub struct MailCatcher {
    port: u16,
    caught: Arc<Mutex<Vec<CaughtMail>>>,
    arrivals: mpsc::UnboundedReceiver<CaughtMail>,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl MailCatcher {
    /// Starts a catcher on a free port that keeps what it catches in memory only.
    pub async fn start() -> Result<MailCatcher> {
        Self::start_with(MailOptions::default()).await
    }

    /// Starts a catcher as `options` say.
    pub async fn start_with(options: MailOptions) -> Result<MailCatcher> {
        let MailOptions { port, keep, refuse_rcpt, forget } = options;
        if let Some(keep) = &keep {
            std::fs::create_dir_all(&keep.dir).context(|| format!("creating {}", keep.dir.display()))?;
        }
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
            .await
            .context(|| format!("listening for SMTP on 127.0.0.1:{port}"))?;
        let port = listener.local_addr().context(|| "reading the SMTP listener's address")?.port();
        let caught: Arc<Mutex<Vec<CaughtMail>>> = Arc::default();
        let connections = Arc::new(AtomicUsize::new(0));
        let (arrived, arrivals) = mpsc::unbounded_channel();
        let refuse_rcpt = Arc::new(Mutex::new(VecDeque::from(refuse_rcpt)));
        let task = tokio::spawn({
            let (caught, connections) = (caught.clone(), connections.clone());
            async move {
                loop {
                    let stream = match listener.accept().await {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            // Out of file descriptors, say: the catcher keeps serving once it can.
                            tracing::warn!(error = %e, "the SMTP catcher could not accept a connection");
                            tokio::time::sleep(ACCEPT_BACKOFF).await;
                            continue;
                        }
                    };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let catch = Catch {
                        caught: caught.clone(),
                        arrived: arrived.clone(),
                        keep: keep.clone(),
                        refuse_rcpt: refuse_rcpt.clone(),
                        forget,
                        from: String::new(),
                        to: Vec::new(),
                        data: Vec::new(),
                    };
                    tokio::spawn(session(stream, catch));
                }
            }
        });
        Ok(MailCatcher { port, caught, arrivals, connections, task })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `smtp://127.0.0.1:<port>`, for `PICLOUD_SMTP_URL`.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every email accepted so far, oldest first.
    pub fn caught(&self) -> Vec<CaughtMail> {
        self.caught.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The next email accepted that this method has not returned yet, waiting for it.
    pub async fn next(&mut self) -> CaughtMail {
        // The sender lives in the accept task, which only `Drop` ends.
        self.arrivals.recv().await.expect("the catcher runs while it exists")
    }

    /// The next email accepted that [`Self::next`] has not returned yet, if one has arrived.
    pub fn try_next(&mut self) -> Option<CaughtMail> {
        self.arrivals.try_recv().ok()
    }

    /// SMTP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for MailCatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The mailin handler of one SMTP session.
struct Catch {
    caught: Arc<Mutex<Vec<CaughtMail>>>,
    arrived: mpsc::UnboundedSender<CaughtMail>,
    keep: Option<MailDir>,
    refuse_rcpt: Arc<Mutex<VecDeque<RcptRefusal>>>,
    forget: bool,
    from: String,
    to: Vec<String>,
    data: Vec<u8>,
}

impl mailin::Handler for Catch {
    fn rcpt(&mut self, _to: &str) -> mailin::Response {
        match self.refuse_rcpt.lock().unwrap_or_else(PoisonError::into_inner).pop_front() {
            Some(RcptRefusal::TryLater) => mailin::response::INTERNAL_ERROR,
            Some(RcptRefusal::NoMailbox) => mailin::response::NO_MAILBOX,
            None => mailin::response::OK,
        }
    }

    fn data_start(&mut self, _domain: &str, from: &str, _is8bit: bool, to: &[String]) -> mailin::Response {
        self.from = from.to_owned();
        self.to = to.to_vec();
        self.data.clear();
        mailin::response::OK
    }

    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.data.extend_from_slice(buf);
        Ok(())
    }

    fn data_end(&mut self) -> mailin::Response {
        let (at, wall) = (Instant::now(), SystemTime::now());
        let text = String::from_utf8_lossy(&self.data).into_owned();
        let (head, body) = split_head(&text);
        let mut mail = CaughtMail {
            from: std::mem::take(&mut self.from),
            to: std::mem::take(&mut self.to),
            subject: header(head, "Subject"),
            message_id: header(head, "Message-ID"),
            first_line: first_text_line(head, body),
            file: None,
            data: text.clone(),
            at,
            wall,
        };
        if let Some(keep) = &self.keep {
            match keep_file(keep, wall, &self.data) {
                Ok(file) => mail.file = Some(file),
                Err(e) => tracing::warn!(error = %e, dir = %keep.dir.display(), "could not keep an email"),
            }
        }
        tracing::info!(
            to = %mail.to.join(", "),
            subject = %mail.subject,
            first_line = %mail.first_line,
            file = %mail.file.as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_default(),
            "email caught"
        );
        if !self.forget {
            self.caught.lock().unwrap_or_else(PoisonError::into_inner).push(mail.clone());
            // Nobody may be waiting for arrivals; `caught` has them regardless.
            let _ = self.arrived.send(mail);
        }
        mailin::response::OK
    }
}

/// A message (or a MIME part) split into its header block and its body.
fn split_head(text: &str) -> (&str, &str) {
    text.split_once("\r\n\r\n").or_else(|| text.split_once("\n\n")).unwrap_or((text, ""))
}

/// The value of header `name` in `head` (unfolded), or "".
fn header(head: &str, name: &str) -> String {
    let mut value: Option<String> = None;
    for line in head.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some(value) = value.as_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
            continue;
        }
        if value.is_some() {
            break;
        }
        if let Some((key, found)) = line.split_once(':')
            && key.eq_ignore_ascii_case(name)
        {
            value = Some(found.trim().to_owned());
        }
    }
    value.unwrap_or_default()
}

/// The first non-empty line of the message's text: of its `text/plain` part when it is
/// multipart, decoded when quoted-printable.
fn first_text_line(head: &str, body: &str) -> String {
    let content_type = header(head, "Content-Type");
    if content_type.to_ascii_lowercase().starts_with("multipart/") {
        let Some(boundary) = content_type.split(';').find_map(|param| {
            let (key, value) = param.split_once('=')?;
            key.trim().eq_ignore_ascii_case("boundary").then(|| value.trim().trim_matches('"').to_owned())
        }) else {
            return String::new();
        };
        let delimiter = format!("--{boundary}");
        let parts: Vec<(&str, &str)> = body
            .split(delimiter.as_str())
            .skip(1)
            .filter(|part| !part.starts_with("--"))
            .map(|part| split_head(part.trim_start_matches(['\r', '\n'])))
            .collect();
        let plain = parts
            .iter()
            .find(|(head, _)| header(head, "Content-Type").to_ascii_lowercase().starts_with("text/plain"));
        return plain.or(parts.first()).map(|(head, body)| first_text_line(head, body)).unwrap_or_default();
    }
    let text = if header(head, "Content-Transfer-Encoding").eq_ignore_ascii_case("quoted-printable") {
        quoted_printable(body)
    } else {
        body.to_owned()
    };
    text.lines().map(str::trim).find(|line| !line.is_empty()).unwrap_or_default().to_owned()
}

/// Decodes quoted-printable text (soft line breaks and `=XX` bytes).
fn quoted_printable(text: &str) -> String {
    let joined = text.replace("=\r\n", "").replace("=\n", "");
    let mut bytes = Vec::with_capacity(joined.len());
    let mut rest = joined.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        let hex = tail
            .get(..2)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (byte, hex) {
            (b'=', Some(decoded)) => {
                bytes.push(decoded);
                rest = &tail[2..];
            }
            _ => {
                bytes.push(byte);
                rest = tail;
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Writes `data` as `<unix time in µs>-<sequence>.eml` into `keep.dir` (written aside and renamed,
/// so a reader never sees half a message) and removes the oldest files beyond `keep.keep`; names
/// sort by arrival.
fn keep_file(keep: &MailDir, wall: SystemTime, data: &[u8]) -> Result<PathBuf> {
    let micros = wall.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros();
    let seq = KEPT.fetch_add(1, Ordering::Relaxed) % 1_000_000;
    let file = keep.dir.join(format!("{micros:020}-{seq:06}.eml"));
    let partial = keep.dir.join(format!(".{micros:020}-{seq:06}.partial"));
    std::fs::write(&partial, data).context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &file).context(|| format!("renaming {}", partial.display()))?;
    let mut kept: Vec<PathBuf> = std::fs::read_dir(&keep.dir)
        .context(|| format!("reading {}", keep.dir.display()))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "eml"))
        .collect();
    kept.sort();
    let excess = kept.len().saturating_sub(keep.keep);
    for old in &kept[..excess] {
        // Another session may have removed it first.
        match std::fs::remove_file(old) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).context(|| format!("removing {}", old.display()));
            }
            _ => {}
        }
    }
    Ok(file)
}

async fn session(stream: tokio::net::TcpStream, catch: Catch) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut session =
        mailin::SessionBuilder::new("picloud-catcher").build(IpAddr::V4(Ipv4Addr::LOCALHOST), catch);
    write.write_all(&session.greeting().buffer()?).await?;
    let mut line = Vec::new();
    loop {
        line.clear();
        if read.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let response = session.process(&line);
        match response.action {
            mailin::Action::Reply => write.write_all(&response.buffer()?).await?,
            mailin::Action::Close => {
                write.write_all(&response.buffer()?).await?;
                return Ok(());
            }
            mailin::Action::UpgradeTls => return Ok(()),
            mailin::Action::NoReply => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catcher_keeps_only_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let keep = MailDir { dir: dir.path().to_owned(), keep: 2 };
        let start = UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let files: Vec<PathBuf> = (0..4u64)
            .map(|i| {
                keep_file(&keep, start + std::time::Duration::from_millis(i), format!("mail {i}").as_bytes())
                    .unwrap()
            })
            .collect();
        let mut left: Vec<PathBuf> =
            std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.path()).collect();
        left.sort();
        assert_eq!(left, files[2..], "the two newest stay");
        assert_eq!(std::fs::read_to_string(&files[3]).unwrap(), "mail 3");
    }

    #[test]
    fn emails_kept_in_the_same_microsecond_are_both_kept() {
        let dir = tempfile::tempdir().unwrap();
        let keep = MailDir { dir: dir.path().to_owned(), keep: 10 };
        let at = UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let first = keep_file(&keep, at, b"first").unwrap();
        let second = keep_file(&keep, at, b"second").unwrap();
        assert_ne!(first, second);
        assert_eq!(std::fs::read_to_string(&first).unwrap(), "first");
        assert_eq!(std::fs::read_to_string(&second).unwrap(), "second");
    }

    #[test]
    fn the_first_line_is_read_from_the_plain_part_and_decoded() {
        let single = "Subject: a\r\nContent-Transfer-Encoding: 7bit\r\n\r\n\r\nHello there\r\nsecond\r\n";
        let (head, body) = split_head(single);
        assert_eq!(first_text_line(head, body), "Hello there");
        let multipart = "Subject: b\r\nContent-Type: multipart/alternative;\r\n boundary=\"XYZ\"\r\n\r\n\
            --XYZ\r\nContent-Type: text/html\r\n\r\n<p>Hi</p>\r\n\
            --XYZ\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\
            Gr=C3=BC=C3=9Fe, a long =\r\nline\r\n--XYZ--\r\n";
        let (head, body) = split_head(multipart);
        assert_eq!(header(head, "Subject"), "b");
        assert_eq!(first_text_line(head, body), "Grüße, a long line");
    }
}
