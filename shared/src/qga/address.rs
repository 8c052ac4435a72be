//! Where the guest agent listens: the host end of a virtio-serial chardev (a Unix
//! socket), an AF_VSOCK port inside the guest, or that port reached through the Unix
//! socket of a hybrid vsock device (a userspace vsock backend such as rust-vmm's
//! `vhost-device-vsock`, Firecracker, Cloud Hypervisor).

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

/// The address of a guest agent.
///
/// Written as `unix:<path>` (or a plain path) for the Unix socket QEMU serves for a
/// `virtserialport` chardev, `vsock:<cid>:<port>` for an agent listening on AF_VSOCK
/// (what EVE gives its guests, reached through the host kernel's vhost-vsock), and
/// `hvsock:<path>:<port>` for the same agent behind a hybrid vsock device: the host
/// connects to the device's Unix socket `<path>`, sends `CONNECT <port>\n` and, after
/// `OK <n>\n`, talks to the guest's listener on `<port>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    Unix(PathBuf),
    Vsock { cid: u32, port: u32 },
    HybridVsock { path: PathBuf, port: u32 },
}

/// A text that is not an agent address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad agent address {text:?}: {reason} (expected unix:<path>, a path, vsock:<cid>:<port> or hvsock:<path>:<port>)"
)]
pub struct ParseAddressError {
    pub text: String,
    pub reason: &'static str,
}

impl Address {
    /// A Unix socket address; the path is made absolute and its folder resolved
    /// ([`absolute`]), so that the address (and the lock and watchdog keyed by it) is the
    /// same for every spelling of one socket.
    pub fn unix(path: impl AsRef<Path>) -> Address {
        let path = path.as_ref();
        Address::Unix(absolute(path))
    }

    /// A hybrid vsock address; the path is made absolute like [`Address::unix`]'s.
    pub fn hybrid_vsock(path: impl AsRef<Path>, port: u32) -> Address {
        Address::HybridVsock {
            path: absolute(path.as_ref()),
            port,
        }
    }
}

/// `path` absolute, its folder resolved as the filesystem has it (symbolic links, `..`);
/// a folder that does not exist (yet) is only cleaned of `.` and `..`. The socket file
/// itself is not followed: it is what the caller named.
fn absolute(path: &Path) -> PathBuf {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let resolved = match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir).ok().map(|dir| dir.join(name)),
        _ => None,
    };
    resolved.unwrap_or_else(|| lexical(&path))
}

/// `path` without `.` and `..` (a `..` takes the component before it away).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

impl FromStr for Address {
    type Err = ParseAddressError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |reason| ParseAddressError {
            text: text.to_string(),
            reason,
        };
        if text.is_empty() {
            return Err(bad("empty"));
        }
        if text.contains('\0') {
            return Err(bad("contains a NUL byte"));
        }
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("empty socket path"));
            }
            return Ok(Address::unix(path));
        }
        if let Some(rest) = text.strip_prefix("vsock:") {
            let (cid, port) = rest
                .split_once(':')
                .ok_or_else(|| bad("vsock needs <cid>:<port>"))?;
            let cid = cid
                .parse()
                .map_err(|_| bad("the vsock cid is not a number"))?;
            let port = port
                .parse()
                .map_err(|_| bad("the vsock port is not a number"))?;
            return Ok(Address::Vsock { cid, port });
        }
        if let Some(rest) = text.strip_prefix("hvsock:") {
            // The port is after the last colon: the socket's path may hold colons itself.
            let (path, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| bad("hvsock needs <path>:<port>"))?;
            if path.is_empty() {
                return Err(bad("empty hybrid vsock socket path"));
            }
            let port = port
                .parse()
                .map_err(|_| bad("the hvsock port is not a number"))?;
            return Ok(Address::hybrid_vsock(path, port));
        }
        // `tcp:` and the like: a scheme we do not speak, not a relative path.
        if let Some((scheme, _)) = text.split_once(':') {
            if !scheme.contains('/')
                && !scheme.is_empty()
                && scheme.chars().all(|c| c.is_ascii_alphanumeric())
            {
                return Err(bad("unknown scheme"));
            }
        }
        Ok(Address::unix(text))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
            Address::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Address::HybridVsock { path, port } => write!(f, "hvsock:{}:{port}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_one_socket_is_one_address() {
        let unix = |text: &str| text.parse::<Address>().expect(text);
        assert_eq!(unix("unix:/x"), unix("/x"));
        assert_eq!(unix("unix:/x"), Address::Unix("/x".into()));
        // A folder that does not exist: `..` and `.` go lexically.
        let missing = "/evesnap-no-such-folder";
        assert_eq!(
            unix(&format!("unix:{missing}/../{missing}/./x")),
            Address::Unix(format!("{missing}/x").into())
        );
        assert_eq!(
            unix("hvsock:/a/../b/v.sock:5").to_string(),
            "hvsock:/b/v.sock:5"
        );
        // A folder reached through a symbolic link, or `..` out of one.
        let base = std::env::temp_dir().join(format!("evesnap-addr-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let real = base.join("real");
        std::fs::create_dir_all(real.join("sub")).expect("folders");
        std::os::unix::fs::symlink(&real, base.join("link")).expect("symlink");
        let canonical = std::fs::canonicalize(&real).expect("real").join("q.sock");
        let want = Address::Unix(canonical);
        for spelling in ["link/q.sock", "real/sub/../q.sock", "link/sub/../q.sock"] {
            let text = format!("unix:{}", base.join(spelling).display());
            assert_eq!(unix(&text), want, "{spelling}");
        }
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn parses_and_prints() {
        assert_eq!(
            "unix:/run/q.sock".parse::<Address>(),
            Ok(Address::Unix("/run/q.sock".into()))
        );
        assert_eq!(
            "/run/q.sock".parse::<Address>(),
            Ok(Address::Unix("/run/q.sock".into()))
        );
        assert_eq!(
            "vsock:3:1234".parse::<Address>(),
            Ok(Address::Vsock { cid: 3, port: 1234 })
        );
        assert_eq!(
            Address::Vsock { cid: 3, port: 1234 }.to_string(),
            "vsock:3:1234"
        );
        assert_eq!(Address::Unix("/a b".into()).to_string(), "unix:/a b");
        assert_eq!(
            "hvsock:/run/vm0/vsock.sock:10000".parse::<Address>(),
            Ok(Address::HybridVsock {
                path: "/run/vm0/vsock.sock".into(),
                port: 10000
            })
        );
        // Colons in the path: the port is after the last one; printing gives it back.
        let colons: Address = "hvsock:/run/a:b/v.sock:7".parse().expect("colons");
        assert_eq!(
            colons,
            Address::HybridVsock {
                path: "/run/a:b/v.sock".into(),
                port: 7
            }
        );
        assert_eq!(colons.to_string().parse::<Address>(), Ok(colons.clone()));
        assert_eq!(colons.to_string(), "hvsock:/run/a:b/v.sock:7");
        let relative: Address = "hvsock:v.sock:1".parse().expect("relative hvsock path");
        assert!(
            matches!(&relative, Address::HybridVsock { path, port: 1 } if path.is_absolute()),
            "{relative}"
        );
        let relative: Address = "q.sock".parse().expect("relative path");
        assert!(
            matches!(&relative, Address::Unix(p) if p.is_absolute()),
            "{relative}"
        );
    }

    #[test]
    fn refuses_nonsense() {
        for text in [
            "",
            "unix:",
            "vsock:3",
            "vsock:x:1",
            "vsock:3:-1",
            "tcp:localhost:4444",
            "hvsock:",
            "hvsock:/v.sock",
            "hvsock::10000",
            "hvsock:/v.sock:",
            "hvsock:/v.sock:port",
            "hvsock:/v.sock:4294967296",
            "hvsock:/v.sock:-1",
            "a\0b",
        ] {
            assert!(text.parse::<Address>().is_err(), "{text:?} parsed");
        }
    }
}
