//! Identity keys on disk. The key is the endpoint's identity: whoever holds
//! it *is* the server (or client), so it is created atomically with mode 0600
//! and never overwritten.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use iroh::SecretKey;

/// Why a key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read identity key {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("identity key {} is malformed (expected 64 hex characters)", path.display())]
    Malformed { path: PathBuf },
    #[error("cannot create identity key {}: {source}", path.display())]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "identity key {} is readable by other users (mode {mode:o}); run: chmod 600 {}",
        path.display(),
        path.display()
    )]
    Exposed { path: PathBuf, mode: u32 },
}

/// Reads an existing key; never creates one.
pub fn load(path: &Path) -> Result<SecretKey, IdentityError> {
    let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0);
    if mode & 0o077 != 0 {
        return Err(IdentityError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    text.trim().parse().map_err(|_| IdentityError::Malformed {
        path: path.to_path_buf(),
    })
}

/// Reads the key at `path`, creating it (and its directory, mode 0700) if it
/// does not exist yet. Two processes racing here end up with the same key.
pub fn load_or_create(path: &Path) -> Result<SecretKey, IdentityError> {
    match load(path) {
        Err(IdentityError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound => {}
        other => return other,
    }
    let create_err = |source| IdentityError::Create {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(create_err)?;
    }
    let key = SecretKey::generate();
    let hex: String = key.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let temp = dir.join(format!(".{}.{}.tmp", file_name(path), std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(create_err)?;
    let written = file
        .write_all(format!("{hex}\n").as_bytes())
        .and_then(|()| file.sync_all());
    drop(file);
    // A hard link fails if the key appeared meanwhile: then the other key wins.
    let linked = written.and_then(|()| std::fs::hard_link(&temp, path));
    let _ = std::fs::remove_file(&temp);
    match linked {
        Ok(()) => {
            // The new name is on disk only once the directory is.
            std::fs::File::open(dir)
                .and_then(|dir| dir.sync_all())
                .map_err(create_err)?;
            tracing::info!(path = %path.display(), "created a new identity key");
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load(path),
        Err(e) => Err(create_err(e)),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "key".into())
}

/// The client's default key: `$XDG_DATA_HOME/p2p-usb/client.key`, else
/// `~/.local/share/p2p-usb/client.key`.
pub fn default_client_key() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("p2p-usb").join("client.key")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("secret.key");
        let key = load_or_create(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::metadata(path.parent().unwrap())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        assert_eq!(load_or_create(&path).unwrap().public(), key.public());
        assert_eq!(load(&path).unwrap().public(), key.public());
    }

    #[test]
    fn refuses_exposed_or_malformed_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        load_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(load(&path), Err(IdentityError::Exposed { .. })));
        std::fs::write(&path, "not a key\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(IdentityError::Malformed { .. })
        ));
        assert!(matches!(
            load(&dir.path().join("absent")),
            Err(IdentityError::Read { .. })
        ));
    }
}
