//! Which local user owns the other end of a loopback TCP connection.
//!
//! A USB/IP gateway listening on 127.0.0.1 must serve only allowed local
//! users; TCP has no `SO_PEERCRED`, but the kernel lists every socket of our
//! network namespace with its owner in `/proc/net/tcp` and `/proc/net/tcp6`.
//! The client's socket is the row whose local address is the client's and
//! whose remote address is ours.
//!
//! Row format (`get_tcp4_sock` / `get_tcp6_sock`, `net/ipv{4,6}/tcp*.c`):
//! `"%4d: %08X:%04X %08X:%04X %02X ..."` then `uid` as the 8th whitespace
//! field. IPv4 addresses are the `__be32` printed as a native `u32`, IPv6
//! addresses are the four `s6_addr32` words each printed that way, so the
//! bytes of each word come out in host order (127.0.0.1 is `0100007F` on
//! little-endian machines); ports are `ntohs`'d, i.e. plain numbers. The uid
//! is translated into the reader's user namespace (unmapped uids read as the
//! overflow uid, usually 65534).

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

/// The real procfs mount, used by [`tcp_peer_uid`].
pub const DEFAULT_PROC_ROOT: &str = "/proc";

/// `TCP_SYN_RECV`: request sockets show the listener's uid, not the client's.
const TCP_SYN_RECV: u8 = 0x03;
/// `TCP_TIME_WAIT`: timewait sockets show uid 0 whoever owned them.
const TCP_TIME_WAIT: u8 = 0x06;
/// `TCP_LISTEN`: never the client end of a connection.
const TCP_LISTEN: u8 = 0x0A;
/// `TCP_NEW_SYN_RECV` (printed as `03`, listed for completeness).
const TCP_NEW_SYN_RECV: u8 = 0x0C;

/// The uid owning the client end of a connection we accepted, so the caller
/// can decide whether to serve it. `local` is the accepted socket's local
/// address, `peer` the address `accept` returned. `None` when no live client
/// socket matches (remote host, other network namespace, or the client has
/// already closed: a `TIME_WAIT` row carries no owner and is ignored).
pub fn tcp_peer_uid(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<u32>> {
    tcp_peer_uid_in(Path::new(DEFAULT_PROC_ROOT), local, peer)
}

/// [`tcp_peer_uid`] reading `<proc_root>/net/tcp{,6}`, so tests can use
/// fixed sample files.
pub fn tcp_peer_uid_in(
    proc_root: &Path,
    local: SocketAddr,
    peer: SocketAddr,
) -> io::Result<Option<u32>> {
    let tcp = proc_root.join("net/tcp");
    let tcp6 = proc_root.join("net/tcp6");
    match (local.ip().to_canonical(), peer.ip().to_canonical()) {
        (IpAddr::V4(l), IpAddr::V4(p)) => {
            // The client may be an AF_INET socket (listed in tcp) or an
            // AF_INET6 one talking to a v4-mapped address (listed in tcp6).
            let found = search(&tcp, (p.into(), peer.port()), (l.into(), local.port()))?;
            if found.is_some() {
                return Ok(found);
            }
            let (l6, p6) = (l.to_ipv6_mapped(), p.to_ipv6_mapped());
            search(&tcp6, (p6.into(), peer.port()), (l6.into(), local.port()))
        }
        (IpAddr::V6(l), IpAddr::V6(p)) => {
            search(&tcp6, (p.into(), peer.port()), (l.into(), local.port()))
        }
        _ => Ok(None),
    }
}

/// Uid of the first owned row with `local_address == want_local` and
/// `rem_address == want_rem`; a missing file (IPv6 disabled) has no rows.
fn search(
    path: &Path,
    want_local: (IpAddr, u16),
    want_rem: (IpAddr, u16),
) -> io::Result<Option<u32>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    for line in BufReader::new(file).split(b'\n') {
        let line = line?;
        let Some(row) = parse_row(&String::from_utf8_lossy(&line)) else {
            continue; // header or unparsable line
        };
        if row.local == want_local && row.rem == want_rem && has_owner(row.state) {
            return Ok(Some(row.uid));
        }
    }
    Ok(None)
}

fn has_owner(state: u8) -> bool {
    !matches!(
        state,
        TCP_SYN_RECV | TCP_TIME_WAIT | TCP_LISTEN | TCP_NEW_SYN_RECV
    )
}

#[derive(Debug, PartialEq, Eq)]
struct Row {
    local: (IpAddr, u16),
    rem: (IpAddr, u16),
    state: u8,
    uid: u32,
}

fn parse_row(line: &str) -> Option<Row> {
    let mut f = line.split_whitespace();
    f.next()?.strip_suffix(':')?; // "sl" column, e.g. "12:"
    let local = parse_addr(f.next()?)?;
    let rem = parse_addr(f.next()?)?;
    let state = u8::from_str_radix(f.next()?, 16).ok()?;
    // tx_queue:rx_queue, tr:tm->when, retrnsmt, then uid.
    let uid = f.nth(3)?.parse().ok()?;
    Some(Row {
        local,
        rem,
        state,
        uid,
    })
}

/// `ADDR:PORT` with ADDR 8 (IPv4) or 32 (IPv6) hex digits of host-order words.
fn parse_addr(s: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    if !addr.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some((ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::process::CommandExt;
    use std::process::Command;
    use std::time::{Duration, Instant};

    fn euid() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    fn accept_within(l: &TcpListener, limit: Duration) -> io::Result<(TcpStream, SocketAddr)> {
        l.set_nonblocking(true)?;
        let deadline = Instant::now() + limit;
        loop {
            match l.accept() {
                Ok((s, a)) => {
                    s.set_nonblocking(false)?;
                    return Ok((s, a));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Connects to `l` from this process and returns (local, peer) as an
    /// accepting server sees them, keeping both ends open.
    fn loopback_pair(l: &TcpListener) -> (TcpStream, TcpStream, SocketAddr, SocketAddr) {
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, peer) = accept_within(l, Duration::from_secs(5)).unwrap();
        let local = server.local_addr().unwrap();
        (client, server, local, peer)
    }

    #[test]
    fn ipv4_loopback_reports_own_uid() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let (client, _server, local, peer) = loopback_pair(&l);
        assert_eq!(peer, client.local_addr().unwrap());
        assert_eq!(tcp_peer_uid(local, peer).unwrap(), Some(euid()));
        let nobody: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(tcp_peer_uid(local, nobody).unwrap(), None);
    }

    #[test]
    fn ipv6_loopback_reports_own_uid() {
        let Ok(l) = TcpListener::bind("[::1]:0") else {
            eprintln!("skipping: no IPv6 loopback");
            return;
        };
        let (_client, _server, local, peer) = loopback_pair(&l);
        assert!(peer.is_ipv6());
        assert_eq!(tcp_peer_uid(local, peer).unwrap(), Some(euid()));
    }

    #[test]
    fn ipv4_client_on_dual_stack_listener_reports_own_uid() {
        let Ok(l) = TcpListener::bind("[::]:0") else {
            eprintln!("skipping: no IPv6");
            return;
        };
        let port = l.local_addr().unwrap().port();
        let Ok(_client) = TcpStream::connect(("127.0.0.1", port)) else {
            eprintln!("skipping: listener is IPv6-only");
            return;
        };
        let (server, peer) = accept_within(&l, Duration::from_secs(5)).unwrap();
        let local = server.local_addr().unwrap();
        assert_eq!(peer.ip().to_canonical(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert!(peer.is_ipv6(), "accepted peer should be v4-mapped: {peer}");
        assert_eq!(tcp_peer_uid(local, peer).unwrap(), Some(euid()));
    }

    #[test]
    fn child_as_nobody_reports_65534() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: needs root to start a child as uid 65534");
            return;
        }
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let script = format!("exec 3<>/dev/tcp/127.0.0.1/{port}; sleep 5");
        let mut child = Command::new("/bin/bash")
            .args(["-c", &script])
            .uid(65534)
            .gid(65534)
            .spawn()
            .unwrap();
        let result = accept_within(&l, Duration::from_secs(10))
            .and_then(|(s, peer)| tcp_peer_uid(s.local_addr()?, peer));
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(result.unwrap(), Some(65534));
    }

    const TCP_SAMPLE: &str = "\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0CA8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1066 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0CA8 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 1101 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:9C40 0100007F:0CA8 01 00000000:00000000 00:00000000 00000000  1000        0 1102 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:9C41 0100007F:0CA8 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
   4: 0500000A:9C40 0100007F:0CA8 01 00000000:00000000 00:00000000 00000000  1003        0 1103 1 0000000000000000 20 4 30 10 -1
garbage line
   5: 0100007F:zz 0100007F:0CA8 01
";

    const TCP6_SAMPLE: &str = "\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:9C42 00000000000000000000000001000000:0CA8 01 00000000:00000000 00:00000000 00000000  1001        0 2201 1 0000000000000000 20 4 30 10 -1
   1: 0000000000000000FFFF00000100007F:9C43 0000000000000000FFFF00000100007F:0CA8 01 00000000:00000000 00:00000000 00000000  1002        0 2202 1 0000000000000000 20 4 30 10 -1
";

    fn sample_proc() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("net")).unwrap();
        std::fs::write(dir.path().join("net/tcp"), TCP_SAMPLE).unwrap();
        std::fs::write(dir.path().join("net/tcp6"), TCP6_SAMPLE).unwrap();
        dir
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn decodes_host_order_words() {
        let v4 = format!("{:08X}:0CA8", u32::from_ne_bytes([127, 0, 0, 1]));
        assert_eq!(
            parse_addr(&v4),
            Some((IpAddr::V4(Ipv4Addr::LOCALHOST), 3240))
        );
        let words = [
            0u32,
            0,
            u32::from_ne_bytes([0, 0, 0xff, 0xff]),
            u32::from_ne_bytes([10, 0, 0, 5]),
        ];
        let v6: String = words.iter().map(|w| format!("{w:08X}")).collect();
        let want: Ipv6Addr = "::ffff:10.0.0.5".parse().unwrap();
        assert_eq!(
            parse_addr(&format!("{v6}:0050")),
            Some((IpAddr::V6(want), 80))
        );
        for bad in [
            "",
            ":",
            "0100007F",
            "0100007F:",
            "0100007:0CA8",
            "é100007F:0CA8",
            "0100007F:10000",
        ] {
            assert_eq!(parse_addr(bad), None, "{bad:?}");
        }
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn sample_files() {
        let proc_root = sample_proc();
        let p = proc_root.path();
        let server = sa("127.0.0.1:3240");
        // Client row (local 40000 -> remote 3240), not the accepted row.
        assert_eq!(
            tcp_peer_uid_in(p, server, sa("127.0.0.1:40000")).unwrap(),
            Some(1000)
        );
        // Same connection seen through a dual-stack listener.
        let mapped = sa("[::ffff:127.0.0.1]:3240");
        let peer = sa("[::ffff:127.0.0.1]:40000");
        assert_eq!(tcp_peer_uid_in(p, mapped, peer).unwrap(), Some(1000));
        // TIME_WAIT rows show uid 0 for everyone: no owner.
        assert_eq!(
            tcp_peer_uid_in(p, server, sa("127.0.0.1:40001")).unwrap(),
            None
        );
        // Non-loopback client address is matched exactly.
        assert_eq!(
            tcp_peer_uid_in(p, server, sa("10.0.0.5:40000")).unwrap(),
            Some(1003)
        );
        // IPv6 loopback.
        assert_eq!(
            tcp_peer_uid_in(p, sa("[::1]:3240"), sa("[::1]:40002")).unwrap(),
            Some(1001)
        );
        // AF_INET6 client socket connected to 127.0.0.1 (listed in tcp6 only).
        assert_eq!(
            tcp_peer_uid_in(p, server, sa("127.0.0.1:40003")).unwrap(),
            Some(1002)
        );
        // Unknown connection and mixed families.
        assert_eq!(
            tcp_peer_uid_in(p, server, sa("127.0.0.1:40009")).unwrap(),
            None
        );
        assert_eq!(tcp_peer_uid_in(p, server, sa("[::1]:40002")).unwrap(), None);
    }

    #[test]
    fn missing_files_mean_no_match() {
        let dir = tempfile::tempdir().unwrap();
        let r = tcp_peer_uid_in(dir.path(), sa("127.0.0.1:1"), sa("127.0.0.1:2")).unwrap();
        assert_eq!(r, None);
    }

    #[test]
    fn listener_and_timewait_rows_have_no_owner() {
        assert!(has_owner(0x01) && has_owner(0x05) && has_owner(0x08));
        assert!(!has_owner(TCP_TIME_WAIT) && !has_owner(TCP_LISTEN) && !has_owner(TCP_SYN_RECV));
    }
}
