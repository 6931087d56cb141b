//! Where an agent keeps its state and its control socket. The system's agent
//! uses the directories its unit declares (or, run by root, the system
//! paths); an agent a user runs for themselves keeps its identity and
//! approvals in a directory of their own, as the client does, instead of
//! failing on `/var/lib`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use p2p_usb_common::config::{AGENT_USER, DEFAULT_CONTROL_SOCKET, DEFAULT_STATE_DIR, ServerConfig};

/// Whose agent this process is or talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The system's, without directories from a unit: [`DEFAULT_STATE_DIR`]
    /// and [`DEFAULT_CONTROL_SOCKET`].
    System,
    /// A unit with `StateDirectory=` (and `RuntimeDirectory=`): the
    /// directories systemd made for it, the system units' or, `personal`,
    /// a user unit's.
    Unit {
        state_dir: PathBuf,
        runtime_dir: Option<PathBuf>,
        personal: bool,
    },
    /// One user's own: state in `$XDG_STATE_HOME/p2p-usb` (default
    /// `~/.local/state/p2p-usb`), the control socket in
    /// `$XDG_RUNTIME_DIR/p2p-usb-agent/`, else in the state directory.
    User {
        state_home: PathBuf,
        runtime_dir: Option<PathBuf>,
    },
}

impl Scope {
    /// The scope of this process: its unit's directories when systemd gives
    /// them (`$STATE_DIRECTORY`, `$RUNTIME_DIRECTORY`); the system's for root
    /// and for the agent's service user; the user's own otherwise.
    pub fn detect() -> Scope {
        let euid = nix::unistd::geteuid();
        let service_user = nix::unistd::User::from_name(AGENT_USER)
            .ok()
            .flatten()
            .is_some_and(|user| user.uid == euid);
        Scope::from_env(euid.is_root() || service_user, |name| {
            std::env::var_os(name)
        })
    }

    /// [`Scope::detect`] with the facts given: `system_user` for root or the
    /// service user, `var` for the environment.
    pub fn from_env(system_user: bool, var: impl Fn(&str) -> Option<OsString>) -> Scope {
        // systemd passes a colon-separated list; the first is the unit's own.
        let first = |name: &str| {
            var(name)
                .and_then(|v| std::env::split_paths(&v).next())
                .filter(|p| p.is_absolute())
        };
        if let Some(state_dir) = first("STATE_DIRECTORY") {
            return Scope::Unit {
                state_dir,
                runtime_dir: first("RUNTIME_DIRECTORY"),
                personal: !system_user,
            };
        }
        if system_user {
            return Scope::System;
        }
        let state_home =
            first("XDG_STATE_HOME").or_else(|| first("HOME").map(|home| home.join(".local/state")));
        match state_home {
            Some(state_home) => Scope::User {
                state_home,
                runtime_dir: first("XDG_RUNTIME_DIR"),
            },
            None => Scope::System,
        }
    }

    /// True for an agent of one user's own: only that user (and root) may
    /// use its control socket.
    pub fn is_personal(&self) -> bool {
        matches!(
            self,
            Scope::User { .. } | Scope::Unit { personal: true, .. }
        )
    }

    fn state_dir(&self) -> PathBuf {
        match self {
            Scope::System => DEFAULT_STATE_DIR.into(),
            Scope::Unit { state_dir, .. } => state_dir.clone(),
            Scope::User { state_home, .. } => state_home.join("p2p-usb"),
        }
    }

    fn control_socket(&self, state_dir: &Path) -> PathBuf {
        match self {
            Scope::System => DEFAULT_CONTROL_SOCKET.into(),
            Scope::Unit {
                runtime_dir: Some(runtime),
                ..
            } => runtime.join("control.sock"),
            Scope::User {
                runtime_dir: Some(runtime),
                ..
            } => runtime.join("p2p-usb-agent").join("control.sock"),
            Scope::Unit { .. } | Scope::User { .. } => state_dir.join("control.sock"),
        }
    }
}

/// What the paths are for: running the agent, or a command that talks to a
/// running one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Serve,
    Command,
}

/// Paths the agent uses: the command line's, else the configuration's, else
/// the defaults of its [`Scope`] (the template units pass per-instance paths).
/// `AgentPaths<Option<PathBuf>>` holds the command line's choices.
#[derive(Debug, Clone, Default)]
pub struct AgentPaths<P = PathBuf> {
    pub helper_socket: P,
    pub state_dir: P,
    pub control_socket: P,
}

impl AgentPaths {
    /// Resolves every path. A command run by a user who never ran an agent
    /// of their own (no state directory) and named no socket talks to the
    /// system's agent: an admin managing the service from their account.
    pub fn resolve(
        config: &ServerConfig,
        overrides: AgentPaths<Option<PathBuf>>,
        scope: &Scope,
        purpose: Purpose,
    ) -> AgentPaths {
        let state_dir = overrides
            .state_dir
            .or_else(|| config.agent.state_dir.clone())
            .unwrap_or_else(|| scope.state_dir());
        let control_socket = overrides
            .control_socket
            .or_else(|| config.agent.control_socket.clone())
            .unwrap_or_else(|| {
                let own = scope.control_socket(&state_dir);
                if purpose == Purpose::Command && scope.is_personal() && !state_dir.exists() {
                    Scope::System.control_socket(&state_dir)
                } else {
                    own
                }
            });
        AgentPaths {
            helper_socket: overrides
                .helper_socket
                .unwrap_or_else(|| config.helper.socket.clone()),
            state_dir,
            control_socket,
        }
    }

    /// Where the server's identity key lives.
    pub fn secret_key(&self) -> PathBuf {
        self.state_dir.join("secret.key")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2p_usb_common::config::ConfigFile;

    fn scope(root: bool, vars: &[(&str, &str)]) -> Scope {
        Scope::from_env(root, |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| OsString::from(v))
        })
    }

    fn config(text: &str) -> ServerConfig {
        ConfigFile::<ServerConfig>::parse(Path::new("server.toml"), text.into())
            .unwrap()
            .value
    }

    #[test]
    fn root_and_the_service_user_use_the_system_paths() {
        let home = [("HOME", "/home/alice"), ("INVOCATION_ID", "abc")];
        assert_eq!(scope(true, &home), Scope::System);
        let paths = AgentPaths::resolve(
            &config(""),
            AgentPaths::default(),
            &Scope::System,
            Purpose::Serve,
        );
        assert_eq!(paths.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert_eq!(paths.control_socket, Path::new(DEFAULT_CONTROL_SOCKET));
        assert_eq!(paths.secret_key(), Path::new("/var/lib/p2p-usb/secret.key"));
    }

    #[test]
    fn a_unit_uses_the_directories_systemd_made_for_it() {
        // The system unit: StateDirectory=p2p-usb, RuntimeDirectory=p2p-usb-agent.
        let unit = scope(
            true,
            &[
                ("STATE_DIRECTORY", "/var/lib/p2p-usb"),
                ("RUNTIME_DIRECTORY", "/run/p2p-usb-agent:/run/other"),
            ],
        );
        let paths = AgentPaths::resolve(&config(""), AgentPaths::default(), &unit, Purpose::Serve);
        assert_eq!(paths.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert_eq!(paths.control_socket, Path::new(DEFAULT_CONTROL_SOCKET));
        assert!(!unit.is_personal());
        // A user unit (systemctl --user) gets its directories below the home.
        let unit = scope(
            false,
            &[
                ("INVOCATION_ID", "abc"),
                ("HOME", "/home/alice"),
                ("STATE_DIRECTORY", "/home/alice/.local/state/p2p-usb"),
            ],
        );
        let paths = AgentPaths::resolve(&config(""), AgentPaths::default(), &unit, Purpose::Serve);
        assert_eq!(
            paths.state_dir,
            Path::new("/home/alice/.local/state/p2p-usb")
        );
        assert!(unit.is_personal(), "a user unit admits its user alone");
        assert_eq!(
            paths.control_socket,
            Path::new("/home/alice/.local/state/p2p-usb/control.sock")
        );
    }

    #[test]
    fn a_user_agent_keeps_its_state_in_the_users_own_directories() {
        // INVOCATION_ID alone (a login shell of some systems has it) says nothing.
        let user = scope(
            false,
            &[
                ("HOME", "/home/alice"),
                ("XDG_RUNTIME_DIR", "/run/user/1000"),
                ("INVOCATION_ID", "abc"),
            ],
        );
        assert!(user.is_personal());
        let paths = AgentPaths::resolve(&config(""), AgentPaths::default(), &user, Purpose::Serve);
        assert_eq!(
            paths.state_dir,
            Path::new("/home/alice/.local/state/p2p-usb")
        );
        assert_eq!(
            paths.control_socket,
            Path::new("/run/user/1000/p2p-usb-agent/control.sock")
        );
        // XDG_STATE_HOME wins over HOME; without a runtime directory the
        // socket lives with the state; relative values are ignored.
        let user = scope(
            false,
            &[
                ("HOME", "/home/alice"),
                ("XDG_STATE_HOME", "/srv/state"),
                ("XDG_RUNTIME_DIR", "tmp"),
            ],
        );
        let paths = AgentPaths::resolve(&config(""), AgentPaths::default(), &user, Purpose::Serve);
        assert_eq!(paths.state_dir, Path::new("/srv/state/p2p-usb"));
        assert_eq!(
            paths.control_socket,
            Path::new("/srv/state/p2p-usb/control.sock")
        );
        assert_eq!(
            scope(false, &[]),
            Scope::System,
            "no home: nothing of the user's to use"
        );
    }

    #[test]
    fn command_line_beats_configuration_beats_scope() {
        let user = scope(false, &[("HOME", "/home/alice")]);
        let file = config("[agent]\nstate_dir = \"/etc-state\"\ncontrol_socket = \"/c.sock\"\n");
        let paths = AgentPaths::resolve(&file, AgentPaths::default(), &user, Purpose::Serve);
        assert_eq!(
            (paths.state_dir.as_path(), paths.control_socket.as_path()),
            (Path::new("/etc-state"), Path::new("/c.sock"))
        );
        let chosen = AgentPaths {
            helper_socket: Some("/h.sock".into()),
            state_dir: Some("/cli-state".into()),
            control_socket: Some("/cli.sock".into()),
        };
        let paths = AgentPaths::resolve(&file, chosen, &user, Purpose::Serve);
        assert_eq!(
            (
                paths.helper_socket.as_path(),
                paths.state_dir.as_path(),
                paths.control_socket.as_path()
            ),
            (
                Path::new("/h.sock"),
                Path::new("/cli-state"),
                Path::new("/cli.sock")
            )
        );
    }

    #[test]
    fn a_command_of_a_user_who_never_ran_an_agent_asks_the_systems() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let user = scope(
            false,
            &[
                ("HOME", home.to_str().unwrap()),
                ("XDG_RUNTIME_DIR", "/run/user/1000"),
            ],
        );
        let ask = |purpose| {
            AgentPaths::resolve(&config(""), AgentPaths::default(), &user, purpose).control_socket
        };
        let own = Path::new("/run/user/1000/p2p-usb-agent/control.sock");
        assert_eq!(ask(Purpose::Command), Path::new(DEFAULT_CONTROL_SOCKET));
        assert_eq!(ask(Purpose::Serve), own);
        // Once the user has an agent of their own (its state exists), their
        // commands go to it, running or not.
        std::fs::create_dir_all(home.join(".local/state/p2p-usb")).unwrap();
        assert_eq!(ask(Purpose::Command), own);
    }
}
