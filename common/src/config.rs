//! The one configuration loader, for `/etc/p2p-usb/server.toml` and the
//! client's `client.toml`.
//!
//! Every error names the file, the line and the key, because an operator
//! reading the journal has nothing else to go on. Unknown keys are errors: a
//! typo in a security setting must never be silently ignored. Values that are
//! only checked later (user names, EndpointIds) keep their position through
//! [`Spanned`] so those checks can report file:line too.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer};
pub use toml::Spanned;

use crate::proto::DeviceInfo;

/// Default location of the server configuration.
pub const DEFAULT_SERVER_CONFIG: &str = "/etc/p2p-usb/server.toml";
/// Default helper socket (the socket unit's `ListenStream=`).
pub const DEFAULT_HELPER_SOCKET: &str = "/run/p2p-usb/helper.sock";
/// Default agent state directory (the unit's `StateDirectory=`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/p2p-usb";
/// Default agent control socket (under the unit's `RuntimeDirectory=`).
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/p2p-usb-agent/control.sock";
/// The user the agent service runs as (packaging/sysusers.d).
pub const AGENT_USER: &str = "p2p-usb";

/// A configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Failed to load configuration: {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Failed to load configuration: {}:{line}:{column}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A built-in default turned out unusable on this machine (e.g. the
    /// default user does not exist); there is no line to point at.
    #[error("Failed to load configuration: {}: {message}", path.display())]
    Default { path: PathBuf, message: String },
}

/// A parsed file together with its text, so later checks can point at lines.
#[derive(Debug, Clone)]
pub struct ConfigFile<T> {
    pub path: PathBuf,
    text: String,
    pub value: T,
}

impl<T: DeserializeOwned> ConfigFile<T> {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, text)
    }

    /// Parses `text` as if it had been read from `path`.
    pub fn parse(path: &Path, text: String) -> Result<Self, ConfigError> {
        match toml::from_str::<T>(&text) {
            Ok(value) => Ok(ConfigFile {
                path: path.to_path_buf(),
                text,
                value,
            }),
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let message = e.message().trim().to_string();
                let (line, column) = line_column(&text, span.start);
                let message = match key_on_line(&text, line) {
                    Some(key) if !message.contains(&format!("`{key}`")) => {
                        format!("key `{key}`: {message}")
                    }
                    _ => message,
                };
                Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    line,
                    column,
                    message,
                })
            }
        }
    }
}

impl<T> ConfigFile<T> {
    /// An error about the value at `span` (from a [`Spanned`] field).
    /// Values that were not in the file (defaults carry the empty span `0..0`)
    /// are reported without a line.
    pub fn error_at(&self, span: Range<usize>, message: impl fmt::Display) -> ConfigError {
        if span == (0..0) {
            return ConfigError::Default {
                path: self.path.clone(),
                message: format!("built-in default: {message}"),
            };
        }
        let (line, column) = line_column(&self.text, span.start);
        let message = match key_on_line(&self.text, line) {
            Some(key) => format!("key `{key}`: {message}"),
            None => message.to_string(),
        };
        ConfigError::Invalid {
            path: self.path.clone(),
            line,
            column,
            message,
        }
    }
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, column)
}

/// The key assigned on a 1-based line, if the line is `key = value`.
fn key_on_line(text: &str, line: usize) -> Option<&str> {
    let content = text.lines().nth(line.checked_sub(1)?)?;
    let (key, _) = content.split_once('=')?;
    let key = key.trim();
    (!key.is_empty() && !key.starts_with('#') && !key.starts_with('[')).then_some(key)
}

/// Log verbosity as written in config files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace,
    Debug,
    #[default]
    Info,
    Warn,
    Error,
}

impl LogLevel {
    /// The name tracing's filter syntax uses.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// `/etc/p2p-usb/server.toml`. Both server processes parse the whole file
/// (so a typo anywhere is caught by whichever starts first) and use their own
/// sections.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub usb: UsbSection,
    #[serde(default)]
    pub security: SecuritySection,
    #[serde(default)]
    pub helper: HelperSection,
    #[serde(default)]
    pub sim: SimSection,
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default)]
    pub iroh: IrohSection,
}

/// The server configuration to read: the one given on the command line, else
/// the systemd credential `server.toml` (how the units pass the root-only
/// `/etc/p2p-usb/server.toml` to their unprivileged users), else the default.
pub fn server_config_path(explicit: Option<&Path>) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_path_buf();
    }
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let credential = Path::new(&dir).join("server.toml");
        if credential.exists() {
            return credential;
        }
    }
    PathBuf::from(DEFAULT_SERVER_CONFIG)
}

/// Loads and checks the server configuration.
pub fn load_server_config(path: &Path) -> Result<ConfigFile<ServerConfig>, ConfigError> {
    let file = ConfigFile::<ServerConfig>::load(path)?;
    file.validate()?;
    Ok(file)
}

impl ConfigFile<ServerConfig> {
    /// Checks that need more than one key at a time.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for rule in &self.value.helper.share {
            rule.get_ref()
                .check()
                .map_err(|msg| self.error_at(rule.span(), msg))?;
        }
        check_iroh(self, &self.value.iroh)
    }

    /// Settings that load but do nothing, each as a line to log at start, so
    /// a configuration written for the single-unit design does not mislead.
    pub fn inert_settings(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if !self.value.server.service_mode {
            notes.push(format!(
                "{}: service_mode = false has no effect: p2p-usb always runs headless",
                self.path.display()
            ));
        }
        notes
    }
}

fn check_iroh<T>(file: &ConfigFile<T>, iroh: &IrohSection) -> Result<(), ConfigError> {
    match (iroh.relay_mode.get_ref(), iroh.relay_urls.is_empty()) {
        (RelayMode::Custom, true) => Err(file.error_at(
            iroh.relay_mode.span(),
            "relay_mode = \"custom\" needs at least one entry in relay_urls",
        )),
        (RelayMode::Default | RelayMode::Disabled, false) => Err(file.error_at(
            iroh.relay_urls[0].span(),
            "relay_urls is only used with relay_mode = \"custom\"",
        )),
        (RelayMode::Disabled, _) if !*iroh.direct_connections.get_ref() => Err(file.error_at(
            iroh.direct_connections.span(),
            "direct_connections = false with relay_mode = \"disabled\" leaves no way to connect",
        )),
        _ => Ok(()),
    }
}

/// `[server]`: keys kept from the original single-process guide.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Headless operation under a service manager.
    #[serde(default = "yes")]
    pub service_mode: bool,
    #[serde(default)]
    pub log_level: LogLevel,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            service_mode: true,
            log_level: LogLevel::Info,
        }
    }
}

fn yes() -> bool {
    true
}

/// `[usb]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsbSection {
    /// Offer every device inside the helper's ceiling without an explicit share.
    #[serde(default)]
    pub auto_share: bool,
}

/// `[security]`: who may use this server over the network.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecuritySection {
    /// EndpointIds allowed in. Empty means nobody, never everybody.
    #[serde(default)]
    pub approved_clients: Vec<Spanned<String>>,
    /// Record unknown clients as pending so an admin can approve them.
    #[serde(default = "yes")]
    pub require_approval: bool,
}

impl Default for SecuritySection {
    fn default() -> Self {
        SecuritySection {
            approved_clients: Vec::new(),
            require_approval: true,
        }
    }
}

/// Which device backend the helper runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Real devices through usbfs.
    #[default]
    Nusb,
    /// Built-in simulated devices, for tests, demos and benchmarks.
    Sim,
}

/// A user or group named in config, by name or number.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Principal {
    Id(u32),
    Name(String),
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Id(id) => write!(f, "{id}"),
            Principal::Name(name) => f.write_str(name),
        }
    }
}

/// `[helper]`: the USB-holding process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelperSection {
    #[serde(default = "default_helper_socket")]
    pub socket: PathBuf,
    #[serde(default)]
    pub backend: BackendKind,
    /// Socket peers allowed by uid.
    #[serde(default = "default_helper_users")]
    pub allowed_users: Vec<Spanned<Principal>>,
    /// Socket peers allowed by primary or supplementary gid.
    #[serde(default)]
    pub allowed_groups: Vec<Spanned<Principal>>,
    /// The share ceiling: no rule, no device.
    #[serde(default)]
    pub share: Vec<Spanned<ShareRule>>,
}

impl Default for HelperSection {
    fn default() -> Self {
        HelperSection {
            socket: default_helper_socket(),
            backend: BackendKind::default(),
            allowed_users: default_helper_users(),
            allowed_groups: Vec::new(),
            share: Vec::new(),
        }
    }
}

fn default_helper_socket() -> PathBuf {
    DEFAULT_HELPER_SOCKET.into()
}

fn default_helper_users() -> Vec<Spanned<Principal>> {
    vec![Spanned::new(0..0, Principal::Name(AGENT_USER.into()))]
}

/// One rule of the helper's share ceiling; every key given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareRule {
    #[serde(default, deserialize_with = "usb_id")]
    pub vid: Option<u16>,
    #[serde(default, deserialize_with = "usb_id")]
    pub pid: Option<u16>,
    pub serial: Option<String>,
    /// Bus-port path as in `/sys/bus/usb/devices`, e.g. `1-1.2`.
    pub port: Option<String>,
    /// Device class, or the class of any interface.
    pub class: Option<u8>,
    /// Matches every device; must stand alone.
    pub all: Option<bool>,
}

impl ShareRule {
    fn check(&self) -> Result<(), String> {
        let narrowing = self.vid.is_some()
            || self.pid.is_some()
            || self.serial.is_some()
            || self.port.is_some()
            || self.class.is_some();
        match (self.all, narrowing) {
            (None, false) => Err(
                "empty share rule would match every device; write `all = true` if that is meant"
                    .into(),
            ),
            (Some(false), _) => Err("`all = false` means nothing; remove the key".into()),
            (Some(true), true) => Err("`all = true` must stand alone in its rule".into()),
            _ => Ok(()),
        }
    }

    /// True if `device` falls under this rule.
    pub fn matches(&self, device: &DeviceInfo) -> bool {
        if self.all == Some(true) {
            return true;
        }
        let class_matches = |class: u8| {
            device.descriptor.class == class
                || device.configurations.iter().any(|c| {
                    c.interfaces
                        .iter()
                        .flat_map(|i| &i.alt_settings)
                        .any(|a| a.class == class)
                })
        };
        self.vid.is_none_or(|v| v == device.key.vid)
            && self.pid.is_none_or(|p| p == device.key.pid)
            && self
                .serial
                .as_ref()
                .is_none_or(|s| device.key.serial.as_ref() == Some(s))
            && self.port.as_ref().is_none_or(|p| *p == device.key.bus_path)
            && self.class.is_none_or(class_matches)
    }
}

/// VID/PID as a TOML integer (`0x0525`) or a 4-digit hex string (`"0525"`).
fn usb_id<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u16>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(i64),
        Text(String),
    }
    match Raw::deserialize(deserializer)? {
        Raw::Number(n) => u16::try_from(n)
            .map(Some)
            .map_err(|_| de::Error::custom(format!("USB id {n} does not fit in 16 bits"))),
        Raw::Text(s) => {
            let digits = s.strip_prefix("0x").unwrap_or(&s);
            if digits.len() == 4 {
                u16::from_str_radix(digits, 16)
                    .map(Some)
                    .map_err(|_| de::Error::custom(format!("USB id {s:?} is not 4 hex digits")))
            } else {
                Err(de::Error::custom(format!(
                    "USB id {s:?} is not 4 hex digits"
                )))
            }
        }
    }
}

/// Simulated device kinds of the `sim` backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SimDeviceKind {
    /// Gadget Zero style vendor device: bulk source/sink and loopback.
    Zero,
    /// HID boot keyboard with an interrupt IN endpoint.
    Keyboard,
}

/// `[sim]`: used only with `backend = "sim"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimSection {
    #[serde(default = "default_sim_devices")]
    pub devices: Vec<SimDeviceKind>,
    /// What the simulated keyboard types after it is opened.
    #[serde(default = "default_keyboard_text")]
    pub keyboard_text: String,
    /// Delay added to every completion, in milliseconds.
    #[serde(default)]
    pub completion_delay_ms: u64,
}

impl Default for SimSection {
    fn default() -> Self {
        SimSection {
            devices: default_sim_devices(),
            keyboard_text: default_keyboard_text(),
            completion_delay_ms: 0,
        }
    }
}

fn default_sim_devices() -> Vec<SimDeviceKind> {
    vec![SimDeviceKind::Zero, SimDeviceKind::Keyboard]
}

fn default_keyboard_text() -> String {
    "p2p-usb\n".into()
}

/// `[agent]`: the network process's own paths.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// The agent's state; unset: [`DEFAULT_STATE_DIR`] for the system's
    /// agent, a directory of the user's own for an agent a user runs.
    pub state_dir: Option<PathBuf>,
    /// Unset: [`DEFAULT_CONTROL_SOCKET`], or one of the user's own (as above).
    pub control_socket: Option<PathBuf>,
    /// Members of this group (and root) may use the control socket.
    #[serde(default = "default_admin_group")]
    pub admin_group: String,
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            state_dir: None,
            control_socket: None,
            admin_group: default_admin_group(),
        }
    }
}

fn default_admin_group() -> String {
    "p2p-usb-admin".into()
}

/// Which relays iroh may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayMode {
    /// The public relays of the iroh project.
    #[default]
    Default,
    /// No relay: direct connections only.
    Disabled,
    /// Only the relays in `relay_urls` (e.g. a self-hosted iroh-relay).
    Custom,
}

/// `[iroh]`: networking, shared by server and client configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IrohSection {
    #[serde(default = "default_relay_mode")]
    pub relay_mode: Spanned<RelayMode>,
    #[serde(default)]
    pub relay_urls: Vec<Spanned<String>>,
    /// UDP bind address; port 0 picks a free port.
    #[serde(default = "default_bind")]
    pub bind_addr: SocketAddr,
    /// Publish and resolve addresses through DNS (pkarr).
    #[serde(default = "yes")]
    pub dns_discovery: bool,
    /// Find peers on the local network with mDNS.
    #[serde(default)]
    pub local_discovery: bool,
    /// Use direct UDP paths (hole punching); false sends everything through
    /// the relay and never reveals this host's addresses to the peer.
    #[serde(default = "spanned_yes")]
    pub direct_connections: Spanned<bool>,
}

impl Default for IrohSection {
    fn default() -> Self {
        IrohSection {
            relay_mode: default_relay_mode(),
            relay_urls: Vec::new(),
            bind_addr: default_bind(),
            dns_discovery: true,
            local_discovery: false,
            direct_connections: spanned_yes(),
        }
    }
}

fn spanned_yes() -> Spanned<bool> {
    Spanned::new(0..0, true)
}

fn default_relay_mode() -> Spanned<RelayMode> {
    Spanned::new(0..0, RelayMode::Default)
}

fn default_bind() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// `client.toml`: the client's own settings and its pinned servers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    #[serde(default)]
    pub client: ClientSection,
    /// Servers this client talks to, pinned by EndpointId.
    #[serde(default)]
    pub servers: Vec<Spanned<ServerEntry>>,
    #[serde(default)]
    pub gateway: GatewaySection,
    #[serde(default)]
    pub iroh: IrohSection,
}

/// Loads and checks a client configuration.
pub fn load_client_config(path: &Path) -> Result<ConfigFile<ClientConfig>, ConfigError> {
    let file = ConfigFile::<ClientConfig>::load(path)?;
    let mut names = std::collections::HashSet::new();
    for server in &file.value.servers {
        if !names.insert(server.get_ref().name.as_str()) {
            return Err(file.error_at(
                server.span(),
                format!("server name {:?} is used twice", server.get_ref().name),
            ));
        }
    }
    check_iroh(&file, &file.value.iroh)?;
    Ok(file)
}

/// `[client]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSection {
    #[serde(default)]
    pub log_level: LogLevel,
    /// The client's identity key; a per-user default when absent.
    pub secret_key: Option<PathBuf>,
}

/// `[[servers]]`: a pinned server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerEntry {
    pub name: String,
    /// The server's EndpointId.
    pub id: String,
    /// Direct addresses to try before discovery.
    #[serde(default)]
    pub addrs: Vec<SocketAddr>,
    /// Home relay of the server, if known.
    pub relay_url: Option<String>,
}

/// `[gateway]`: the local USB/IP server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    #[serde(default = "default_gateway_listen")]
    pub listen: SocketAddr,
    /// Local users allowed besides the one running the gateway and root.
    #[serde(default)]
    pub allowed_users: Vec<Spanned<Principal>>,
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            listen: default_gateway_listen(),
            allowed_users: Vec::new(),
        }
    }
}

fn default_gateway_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 3240))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ConfigFile<ServerConfig>, ConfigError> {
        let file =
            ConfigFile::<ServerConfig>::parse(Path::new("/etc/p2p-usb/server.toml"), text.into())?;
        file.validate()?;
        Ok(file)
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn service_mode_false_is_reported_as_inert() {
        assert!(
            parse("[server]\nservice_mode = true\n")
                .unwrap()
                .inert_settings()
                .is_empty()
        );
        let notes = parse("[server]\nservice_mode = false\n")
            .unwrap()
            .inert_settings();
        assert_eq!(notes.len(), 1);
        assert!(
            notes[0].contains("service_mode = false has no effect"),
            "{notes:?}"
        );
    }

    #[test]
    fn original_guide_config_loads() {
        let file = parse(
            r#"
[server]
service_mode = true
log_level = "debug"

[usb]
auto_share = false

[security]
approved_clients = []
require_approval = true
"#,
        )
        .unwrap();
        assert_eq!(file.value.server.log_level, LogLevel::Debug);
        assert!(file.value.security.require_approval);
        assert_eq!(file.value.helper.socket, Path::new(DEFAULT_HELPER_SOCKET));
        assert!(file.value.helper.share.is_empty(), "no rule, no device");
    }

    #[test]
    fn empty_file_gets_safe_defaults() {
        let file = parse("").unwrap();
        assert!(file.value.security.approved_clients.is_empty());
        assert!(file.value.security.require_approval);
        assert!(!file.value.usb.auto_share);
        assert_eq!(file.value.helper.backend, BackendKind::Nusb);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let msg = error("[server]\nlog_level = \"info\"\nlog_levle = \"debug\"\n");
        assert!(
            msg.starts_with("Failed to load configuration: /etc/p2p-usb/server.toml:3:"),
            "{msg}"
        );
        assert!(msg.contains("log_levle"), "{msg}");
    }

    #[test]
    fn unknown_section_is_an_error() {
        let msg = error("[securty]\nrequire_approval = false\n");
        assert!(msg.contains(":1:"), "{msg}");
        assert!(msg.contains("securty"), "{msg}");
    }

    #[test]
    fn bad_value_names_line_and_key() {
        let msg = error("[usb]\n\nauto_share = \"yes\"\n");
        assert!(msg.contains("server.toml:3:"), "{msg}");
        assert!(msg.contains("auto_share"), "{msg}");
        let msg = error("[server]\nlog_level = \"loud\"\n");
        assert!(msg.contains(":2:") && msg.contains("log_level"), "{msg}");
    }

    #[test]
    fn share_rules_are_checked() {
        let file = parse("[[helper.share]]\nvid = 0x0525\npid = \"a4a0\"\n").unwrap();
        let rule = file.value.helper.share[0].get_ref();
        assert_eq!((rule.vid, rule.pid), (Some(0x0525), Some(0xa4a0)));

        let msg = error("[helper]\nbackend = \"sim\"\n\n[[helper.share]]\n");
        assert!(msg.contains(":4:") && msg.contains("all = true"), "{msg}");
        let msg = error("[[helper.share]]\nall = true\nvid = 1\n");
        assert!(msg.contains("stand alone"), "{msg}");
        let msg = error("[[helper.share]]\nvid = \"52\"\n");
        assert!(msg.contains(":2:") && msg.contains("vid"), "{msg}");
        let msg = error("[[helper.share]]\nvid = 70000\n");
        assert!(msg.contains("16 bits"), "{msg}");
    }

    #[test]
    fn relay_settings_are_consistent() {
        let msg = error("[iroh]\nrelay_mode = \"custom\"\n");
        assert!(msg.contains(":2:") && msg.contains("relay_urls"), "{msg}");
        let msg = error("[iroh]\nrelay_urls = [\"https://relay.example\"]\n");
        assert!(msg.contains("only used with"), "{msg}");
        parse("[iroh]\nrelay_mode = \"custom\"\nrelay_urls = [\"https://relay.example\"]\n")
            .unwrap();
        let msg = error("[iroh]\nrelay_mode = \"disabled\"\ndirect_connections = false\n");
        assert!(
            msg.contains(":3:") && msg.contains("no way to connect"),
            "{msg}"
        );
        parse("[iroh]\ndirect_connections = false\n").unwrap();
    }

    #[test]
    fn spanned_values_report_their_line() {
        let file = parse("[security]\napproved_clients = [\n  \"good\",\n  \"bad\",\n]\n").unwrap();
        let bad = &file.value.security.approved_clients[1];
        let msg = file.error_at(bad.span(), "not an EndpointId").to_string();
        assert!(msg.contains("server.toml:4:3:"), "{msg}");
    }

    #[test]
    fn missing_file_says_failed_to_load() {
        let err =
            ConfigFile::<ServerConfig>::load(Path::new("/nonexistent/p2p-usb.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(
            err.to_string()
                .starts_with("Failed to load configuration: /nonexistent/p2p-usb.toml: ")
        );
    }

    #[test]
    fn client_config_rejects_duplicate_names() {
        let dir = std::env::temp_dir().join(format!("p2p-usb-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("client.toml");
        std::fs::write(
            &path,
            "[[servers]]\nname = \"a\"\nid = \"x\"\n\n[[servers]]\nname = \"a\"\nid = \"y\"\n",
        )
        .unwrap();
        let msg = load_client_config(&path).unwrap_err().to_string();
        assert!(msg.contains("used twice") && msg.contains(":5:"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
