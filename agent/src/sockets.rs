//! The downstream sockets of a process: connections it opened itself (to PostgreSQL, Redis, an
//! HTTP service ...) over TCP or UNIX stream sockets, as opposed to the ones it accepted or
//! listens on. The agent reads them when it attaches to workers whose connections already exist.
//!
//! TCP comes from the process's own /proc/<pid>/net/tcp{,6} (its network namespace): an accepted
//! socket has a listener's local port, a downstream one does not. UNIX comes from sock_diag,
//! because /proc/net/unix does not tell a socket's peer.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use anyhow::Context;
use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::unix::{nlas::UnixDiagName, ShowFlags, StateFlags, UnixRequest};
use netlink_packet_sock_diag::{SockDiagMessage, SOCK_STREAM, TCP_ESTABLISHED};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};
use procfs::net::{TcpNetEntry, TcpState};
use procfs::process::{FDTarget, Process};

/// Where a downstream socket is connected to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    /// A filesystem path, or an abstract name written "@name".
    Unix(String),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(addr) => addr.fmt(f),
            Peer::Unix(path) => f.write_str(path),
        }
    }
}

/// Downstream sockets of process `pid`: fd -> peer, by fd. Errors only if /proc/<pid> cannot be
/// read; a socket table that cannot be read is logged and its sockets left out.
pub fn downstream_of(pid: u32) -> anyhow::Result<Vec<(u32, Peer)>> {
    let as_i32 = i32::try_from(pid).with_context(|| format!("pid {pid}"))?;
    let process = Process::new(as_i32).with_context(|| format!("process {pid}"))?;
    // Fds closed while the directory is read are skipped by flatten().
    let sockets: Vec<(u32, u64)> = process
        .fd()
        .with_context(|| format!("fds of process {pid}"))?
        .flatten()
        .filter_map(|fd| match fd.target {
            FDTarget::Socket(inode) => Some((u32::try_from(fd.fd).ok()?, inode)),
            _ => None,
        })
        .collect();
    if sockets.is_empty() {
        return Ok(Vec::new());
    }

    let tcp = tcp_peers(&process);
    let unix = if sockets.iter().all(|(_, inode)| tcp.contains_key(inode)) {
        HashMap::new()
    } else {
        match unix_sockets(pid) {
            Ok(table) => unix_peers(&table),
            Err(e) => {
                log::warn!("unix sockets of process {pid}: {e}");
                HashMap::new()
            }
        }
    };

    let mut found: Vec<(u32, Peer)> = sockets
        .into_iter()
        .filter_map(|(fd, inode)| {
            let peer = match tcp.get(&inode) {
                Some(addr) => Peer::Tcp(*addr),
                None => Peer::Unix(unix.get(&u32::try_from(inode).ok()?)?.clone()),
            };
            Some((fd, peer))
        })
        .collect();
    found.sort_by_key(|(fd, _)| *fd);
    Ok(found)
}

/// Inode -> remote address of the downstream TCP sockets in the process's network namespace.
fn tcp_peers(process: &Process) -> HashMap<u64, SocketAddr> {
    let mut entries: Vec<TcpNetEntry> = Vec::new();
    for (family, table) in [("tcp", process.tcp()), ("tcp6", process.tcp6())] {
        match table {
            Ok(table) => entries.extend(table),
            // tcp6 is missing where IPv6 is disabled.
            Err(e) => log::debug!("{family} table of process {}: {e}", process.pid),
        }
    }
    // An accepted socket keeps its listener's local port; a client's is ephemeral.
    let listening: HashSet<u16> = entries
        .iter()
        .filter(|e| e.state == TcpState::Listen)
        .map(|e| e.local_address.port())
        .collect();
    entries
        .into_iter()
        .filter(|e| matches!(e.state, TcpState::Established | TcpState::SynSent))
        .filter(|e| !listening.contains(&e.local_address.port()))
        // An IPv6 socket connected to an IPv4 address shows it as ::ffff:a.b.c.d.
        .map(|e| {
            let remote =
                SocketAddr::new(e.remote_address.ip().to_canonical(), e.remote_address.port());
            (e.inode, remote)
        })
        .collect()
}

/// One unix socket as sock_diag describes it.
#[derive(Debug)]
struct UnixSocket {
    kind: u8,
    state: u8,
    /// Bound path or "@abstract"; an accepted socket carries its listener's.
    name: Option<String>,
    /// Inode of the connected peer.
    peer: Option<u32>,
}

/// Inode -> peer path of the downstream unix stream sockets in `table`: connected, without a
/// name of their own (an accepted socket has the listener's), and with a peer that has one (a
/// socketpair's peer has none).
fn unix_peers(table: &HashMap<u32, UnixSocket>) -> HashMap<u32, String> {
    table
        .iter()
        .filter(|(_, s)| s.kind == SOCK_STREAM && s.state == TCP_ESTABLISHED && s.name.is_none())
        .filter_map(|(inode, s)| {
            let name = table.get(&s.peer?)?.name.clone()?;
            Some((*inode, name))
        })
        .collect()
}

/// All established unix sockets of `pid`'s network namespace, by inode, with their names and
/// peers: one NETLINK_SOCK_DIAG dump request (UDIAG_SHOW_NAME | UDIAG_SHOW_PEER).
///
/// The kernel answers about the namespace the netlink socket was created in, so the socket is
/// created in `pid`'s namespace when it is not ours (which needs CAP_SYS_ADMIN).
fn unix_sockets(pid: u32) -> io::Result<HashMap<u32, UnixSocket>> {
    let socket = diag_socket_in_netns_of(pid)?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::UnixRequest(UnixRequest {
            state_flags: StateFlags::ESTABLISHED,
            inode: 0,
            show_flags: ShowFlags::NAME | ShowFlags::PEER,
            cookie: [0; 8],
        })
        .into(),
    );
    request.finalize();
    let mut bytes = vec![0; request.buffer_len()];
    request.serialize(&mut bytes);
    socket.send(&bytes, 0)?;

    let mut table = HashMap::new();
    // A dump datagram is at most 32 KiB; the kernel ends the dump with NLMSG_DONE.
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        buf.clear();
        let size = socket.recv(&mut buf, 0)?;
        if size == 0 || size > buf.len() {
            return Err(io::Error::other("sock_diag reply empty or truncated"));
        }
        let mut rest = &buf[..];
        while !rest.is_empty() {
            let length = NetlinkBuffer::new_checked(rest)
                .map_err(|e| io::Error::other(format!("sock_diag reply: {e}")))?
                .length() as usize;
            // Messages are 4-byte aligned; new_checked made sure length fits in rest.
            let message = &rest[..length];
            rest = &rest[length.next_multiple_of(4).min(rest.len())..];
            // One message the crate cannot parse (an odd name) costs only that socket.
            let Ok(message) = NetlinkMessage::<SockDiagMessage>::deserialize(message) else {
                continue;
            };
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::UnixResponse(r)) => {
                    let name = r.name().map(|name| match name {
                        UnixDiagName::Pathname(path) => path.to_string_lossy().into_owned(),
                        // Written as /proc/net/unix and ss write it.
                        UnixDiagName::Abstract(bytes) => {
                            format!("@{}", String::from_utf8_lossy(bytes).replace('\0', "@"))
                        }
                    });
                    let socket = UnixSocket {
                        kind: r.header.kind,
                        state: r.header.state,
                        name,
                        peer: r.peer(),
                    };
                    table.insert(r.header.inode, socket);
                }
                NetlinkPayload::Done(_) => return Ok(table),
                NetlinkPayload::Error(e) => {
                    return Err(e.to_io());
                }
                _ => {}
            }
        }
    }
}

/// A NETLINK_SOCK_DIAG socket in `pid`'s network namespace.
fn diag_socket_in_netns_of(pid: u32) -> io::Result<Socket> {
    let target = File::open(format!("/proc/{pid}/ns/net"))?;
    let ours = std::fs::metadata("/proc/thread-self/ns/net")?;
    let theirs = target.metadata()?;
    let socket = if (ours.dev(), ours.ino()) == (theirs.dev(), theirs.ino()) {
        Socket::new(NETLINK_SOCK_DIAG)?
    } else {
        // setns changes only the calling thread: a thread of its own keeps the agent's other
        // threads where they are, and the socket stays in the namespace it was created in.
        std::thread::spawn(move || {
            // SAFETY: setns only reads the fd, which `target` keeps open for the call.
            if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Socket::new(NETLINK_SOCK_DIAG)
        })
        .join()
        .map_err(|_| io::Error::other("setns thread panicked"))??
    };
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{UnixListener, UnixStream};

    fn ours() -> Vec<(u32, Peer)> {
        downstream_of(std::process::id()).unwrap()
    }

    fn fd(s: &impl AsRawFd) -> u32 {
        s.as_raw_fd() as u32
    }

    fn peer_of(found: &[(u32, Peer)], fd: u32) -> Option<&Peer> {
        found.iter().find(|(f, _)| *f == fd).map(|(_, p)| p)
    }

    #[test]
    fn tcp_clients_are_listed_accepted_and_listeners_not() {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = TcpListener::bind("[::1]:0").unwrap();
        let client4 = TcpStream::connect(v4.local_addr().unwrap()).unwrap();
        let client6 = TcpStream::connect(v6.local_addr().unwrap()).unwrap();
        let (accepted4, _) = v4.accept().unwrap();
        let (accepted6, _) = v6.accept().unwrap();

        let found = ours();
        assert_eq!(peer_of(&found, fd(&client4)), Some(&Peer::Tcp(v4.local_addr().unwrap())));
        assert_eq!(peer_of(&found, fd(&client6)), Some(&Peer::Tcp(v6.local_addr().unwrap())));
        for other in [fd(&accepted4), fd(&accepted6), fd(&v4), fd(&v6)] {
            assert_eq!(peer_of(&found, other), None, "fd {other} in {found:?}");
        }
        let shown = peer_of(&found, fd(&client6)).unwrap().to_string();
        assert_eq!(shown, format!("[::1]:{}", v6.local_addr().unwrap().port()));
    }

    #[test]
    fn unix_client_is_listed_with_the_path() {
        let path =
            std::env::temp_dir().join(format!("wsgiscope-sockets-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let client = UnixStream::connect(&path).unwrap();
        let (accepted, _) = listener.accept().unwrap();

        let found = ours();
        std::fs::remove_file(&path).unwrap();
        let expected = Peer::Unix(path.to_str().unwrap().to_string());
        assert_eq!(peer_of(&found, fd(&client)), Some(&expected));
        assert_eq!(expected.to_string(), path.to_str().unwrap());
        for other in [fd(&accepted), fd(&listener)] {
            assert_eq!(peer_of(&found, other), None, "fd {other} in {found:?}");
        }
    }

    #[test]
    fn abstract_unix_peer_is_written_with_an_at() {
        let name = format!("wsgiscope-sockets-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        let listener = UnixListener::bind_addr(&addr).unwrap();
        let client = UnixStream::connect_addr(&addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();

        let found = ours();
        let shown = peer_of(&found, fd(&client)).map(|p| p.to_string());
        assert_eq!(shown, Some(format!("@{name}")));
        assert_eq!(peer_of(&found, fd(&accepted)), None);
    }

    #[test]
    fn socketpair_is_not_listed() {
        let (a, b) = UnixStream::pair().unwrap();
        let found = ours();
        assert_eq!(peer_of(&found, fd(&a)), None);
        assert_eq!(peer_of(&found, fd(&b)), None);
    }

    #[test]
    fn missing_process_is_an_error() {
        // Above the kernel's largest pid_max (2^22).
        let err = downstream_of(1 << 30).unwrap_err();
        assert!(format!("{err:#}").contains(&(1u32 << 30).to_string()), "{err:#}");
    }
}
