//! Where a request goes: the host over vsock (`vsock:<cid>:<port>`, by default CID 2 on
//! [`evesnap::request::VSOCK_PORT`]), or a path: the virtio-serial port (the fallback
//! channel) or a Unix socket whose server plays the host.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Vsock { cid: u32, port: u32 },
    Path(PathBuf),
}

impl FromStr for Target {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = text.strip_prefix("vsock:") {
            let bad = || format!("{text:?}: expected vsock:<cid>:<port> (numbers)");
            let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
            return Ok(Target::Vsock {
                cid: cid.parse().map_err(|_| bad())?,
                port: port.parse().map_err(|_| bad())?,
            });
        }
        if text.is_empty() {
            return Err("empty channel".into());
        }
        Ok(Target::Path(PathBuf::from(text)))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Target::Path(path) => write!(f, "{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use evesnap::request;

    #[test]
    fn the_default_is_the_host_over_vsock() {
        assert_eq!(
            request::DEFAULT_CHANNEL.parse::<Target>(),
            Ok(Target::Vsock {
                cid: request::HOST_CID,
                port: request::VSOCK_PORT
            })
        );
        assert_eq!(
            request::SERIAL_CHANNEL.parse::<Target>(),
            Ok(Target::Path(request::SERIAL_CHANNEL.into()))
        );
        assert_eq!(Target::Vsock { cid: 2, port: 7 }.to_string(), "vsock:2:7");
    }

    #[test]
    fn bad_vsock_addresses_are_refused() {
        for text in [
            "",
            "vsock:",
            "vsock:2",
            "vsock:x:1",
            "vsock:2:-1",
            "vsock:2:99999999999",
        ] {
            assert!(text.parse::<Target>().is_err(), "{text:?}");
        }
    }
}
