//! Local access control by kernel-verified credentials.
//!
//! The helper socket, the agent's control socket and the client's USB/IP
//! gateway all decide who may talk to them from what the kernel says about the
//! peer (`SO_PEERCRED`, `SO_PEERGROUPS`), never from anything the peer sends.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{getsockopt, sockopt};
use nix::unistd::{Gid, Group, Uid, User};

use crate::config::{ConfigError, ConfigFile, Principal, Spanned};

/// Who is on the other end of a local socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCredentials {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups at connect time.
    pub groups: Vec<u32>,
}

impl PeerCredentials {
    /// Reads the peer's credentials of a connected Unix socket.
    pub fn of_unix_socket(socket: &impl AsFd) -> io::Result<Self> {
        let cred = getsockopt(socket, sockopt::PeerCredentials).map_err(io::Error::from)?;
        Ok(PeerCredentials {
            pid: cred.pid(),
            uid: cred.uid(),
            gid: cred.gid(),
            groups: peer_groups(socket).unwrap_or_default(),
        })
    }

    /// Builds credentials for a local user known only by uid (a loopback TCP
    /// peer), with the groups the user database gives that user.
    pub fn of_uid(uid: u32) -> Self {
        let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
        let gid = user.as_ref().map_or(u32::MAX, |u| u.gid.as_raw());
        let groups = user
            .and_then(|u| {
                let name = std::ffi::CString::new(u.name).ok()?;
                nix::unistd::getgrouplist(&name, u.gid).ok()
            })
            .map(|gs| gs.into_iter().map(Gid::as_raw).collect())
            .unwrap_or_default();
        PeerCredentials {
            pid: 0,
            uid,
            gid,
            groups,
        }
    }
}

impl fmt::Display for PeerCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid={} gid={}", self.uid, self.gid)?;
        if self.pid != 0 {
            write!(f, " pid={}", self.pid)?;
        }
        Ok(())
    }
}

/// `SO_PEERGROUPS` (Linux 4.13+): the peer's supplementary groups, captured
/// by the kernel at connect time, so no racy read of `/proc/PID/status`.
fn peer_groups(socket: &impl AsFd) -> io::Result<Vec<u32>> {
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut len = (groups.len() * size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the buffer is valid for `len` bytes and the kernel writes at most `len`.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_fd().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && count > groups.len() && count <= 65536 {
            groups.resize(count, 0);
            continue;
        }
        return Err(err);
    }
}

/// A set of allowed users and groups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessList {
    uids: BTreeSet<u32>,
    gids: BTreeSet<u32>,
}

impl AccessList {
    /// Allows exactly these uids and gids.
    pub fn new(uids: impl IntoIterator<Item = u32>, gids: impl IntoIterator<Item = u32>) -> Self {
        AccessList {
            uids: uids.into_iter().collect(),
            gids: gids.into_iter().collect(),
        }
    }

    /// Resolves user and group names from a config file; an unknown name is a
    /// config error pointing at its line, never silently dropped.
    pub fn resolve<T>(
        file: &ConfigFile<T>,
        users: &[Spanned<Principal>],
        groups: &[Spanned<Principal>],
    ) -> Result<Self, ConfigError> {
        let mut list = AccessList::default();
        for user in users {
            let uid = match user.get_ref() {
                Principal::Id(id) => *id,
                Principal::Name(name) => match User::from_name(name) {
                    Ok(Some(u)) => u.uid.as_raw(),
                    _ => return Err(file.error_at(user.span(), format!("no user named {name:?}"))),
                },
            };
            list.uids.insert(uid);
        }
        for group in groups {
            let gid = match group.get_ref() {
                Principal::Id(id) => *id,
                Principal::Name(name) => match Group::from_name(name) {
                    Ok(Some(g)) => g.gid.as_raw(),
                    _ => {
                        return Err(file.error_at(group.span(), format!("no group named {name:?}")));
                    }
                },
            };
            list.gids.insert(gid);
        }
        Ok(list)
    }

    /// Adds a uid.
    pub fn allow_uid(&mut self, uid: u32) {
        self.uids.insert(uid);
    }

    /// Adds a gid.
    pub fn allow_gid(&mut self, gid: u32) {
        self.gids.insert(gid);
    }

    /// True if the peer's uid, primary gid or any supplementary gid is allowed.
    pub fn allows(&self, peer: &PeerCredentials) -> bool {
        self.uids.contains(&peer.uid)
            || self.gids.contains(&peer.gid)
            || peer.groups.iter().any(|g| self.gids.contains(g))
    }
}

impl fmt::Display for AccessList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uids {:?}, gids {:?}", self.uids, self.gids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn reads_own_credentials_through_a_socket_pair() {
        let (a, _b) = UnixStream::pair().unwrap();
        let peer = PeerCredentials::of_unix_socket(&a).unwrap();
        assert_eq!(peer.uid, nix::unistd::getuid().as_raw());
        assert_eq!(peer.gid, nix::unistd::getgid().as_raw());
        assert_eq!(peer.pid, std::process::id() as i32);
        let mut own: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(Gid::as_raw)
            .collect();
        own.sort();
        let mut seen = peer.groups.clone();
        seen.sort();
        assert_eq!(seen, own);
    }

    #[test]
    fn allows_by_uid_gid_or_supplementary_group() {
        let list = AccessList::new([1000], [50]);
        let peer = |uid, gid, groups: &[u32]| PeerCredentials {
            pid: 1,
            uid,
            gid,
            groups: groups.to_vec(),
        };
        assert!(list.allows(&peer(1000, 1, &[])));
        assert!(list.allows(&peer(2, 50, &[])));
        assert!(list.allows(&peer(2, 3, &[7, 50])));
        assert!(!list.allows(&peer(2, 3, &[7])));
        assert!(
            !AccessList::default().allows(&peer(0, 0, &[0])),
            "empty list allows nobody"
        );
    }

    #[test]
    fn unknown_user_is_a_config_error_with_a_line() {
        #[derive(serde::Deserialize)]
        struct T {
            users: Vec<Spanned<Principal>>,
        }
        let file = ConfigFile::<T>::parse(
            std::path::Path::new("x.toml"),
            "users = [\n 0,\n \"no-such-user-p2p\",\n]\n".into(),
        )
        .unwrap();
        let err = AccessList::resolve(&file, &file.value.users, &[]).unwrap_err();
        assert!(err.to_string().contains("x.toml:3:2"), "{err}");
        let ok = AccessList::resolve(&file, &file.value.users[..1], &[]).unwrap();
        assert!(ok.allows(&PeerCredentials::of_uid(0)));
    }
}
