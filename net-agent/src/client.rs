//! The client's view of a server: its own identity and endpoint, the pinned
//! servers of `client.toml`, and sessions (one bidirectional stream each,
//! speaking the common vocabulary) over a connection that is re-established
//! when it drops.

use std::path::{Path, PathBuf};
use std::time::Duration;

use iroh::endpoint::{Connection, ConnectionError};
use iroh::{Endpoint, EndpointAddr, EndpointId, RelayUrl};
use p2p_usb_common::config::{self, ClientConfig, ConfigError, ConfigFile};
use p2p_usb_common::link::{LinkClient, LinkError};
use p2p_usb_common::proto::{DeviceInfo, DeviceKey, Event, Handle, Reply, Request, UsbError};
use tokio::sync::mpsc;

use crate::identity::{self, IdentityError};
use crate::net::{self, AddrError, NetError, close};

/// Program name sent in hellos.
pub const SOFTWARE: &str = "p2p-usb";
/// How long connecting to a server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Everything a client command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Addr(#[from] AddrError),
    #[error(
        "unknown server {0:?}: not a ticket, not an EndpointId, and no [[servers]] entry has that name"
    )]
    UnknownServer(String),
    #[error("cannot connect to server {server}: {reason}")]
    Connect { server: EndpointId, reason: String },
    #[error(
        "server {server} refused this client ({reason}). Ask its admin to run: p2p-usb-agent approve {client}"
    )]
    NotApproved {
        server: EndpointId,
        client: EndpointId,
        reason: String,
    },
    #[error("server {server} closed the session: {reason}")]
    Session { server: EndpointId, reason: String },
    #[error("{0}")]
    Usb(#[from] UsbError),
    #[error("no device matches {spec:?}; the server offers: {available}")]
    NoSuchDevice { spec: String, available: String },
}

/// The client config file to use: the given one, else the user's, else the
/// system's, else none (built-in defaults).
pub fn config_path(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = explicit {
        return Some(path.to_path_buf());
    }
    let user = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|base| base.join("p2p-usb").join("client.toml"));
    user.into_iter()
        .chain([PathBuf::from("/etc/p2p-usb/client.toml")])
        .find(|p| p.exists())
}

/// Loads the client configuration (defaults when there is no file).
pub fn load_config(explicit: Option<&Path>) -> Result<ConfigFile<ClientConfig>, ConfigError> {
    match config_path(explicit) {
        Some(path) => config::load_client_config(&path),
        None => Ok(ConfigFile::parse(
            Path::new("(built-in defaults)"),
            String::new(),
        )?),
    }
}

/// A client identity with its endpoint.
pub struct Client {
    config: ConfigFile<ClientConfig>,
    endpoint: Endpoint,
}

impl Client {
    /// Loads (or creates) the client key and binds the endpoint.
    pub async fn start(config: ConfigFile<ClientConfig>) -> Result<Client, ClientError> {
        let key_path = config
            .value
            .client
            .secret_key
            .clone()
            .unwrap_or_else(identity::default_client_key);
        let key = identity::load_or_create(&key_path)?;
        let relays = net::relay_urls(&config, &config.value.iroh)?;
        let endpoint = net::bind_endpoint(&config.value.iroh, &relays, key, false).await?;
        Ok(Client { config, endpoint })
    }

    /// This client's EndpointId (what a server admin approves).
    pub fn id(&self) -> EndpointId {
        self.endpoint.id()
    }

    /// The loaded configuration.
    pub fn config(&self) -> &ConfigFile<ClientConfig> {
        &self.config
    }

    /// Resolves a server given as a ticket, an EndpointId, or a name from
    /// `[[servers]]` (pinned id plus any addresses listed there).
    pub fn resolve(&self, server: &str) -> Result<EndpointAddr, ClientError> {
        if let Some(entry) = self
            .config
            .value
            .servers
            .iter()
            .find(|s| s.get_ref().name == server)
        {
            let entry_ref = entry.get_ref();
            let id = net::parse_endpoint_id(&entry_ref.id)
                .map_err(|e| self.config.error_at(entry.span(), e))?;
            let mut addr = EndpointAddr::new(id);
            for socket in &entry_ref.addrs {
                addr = addr.with_ip_addr(*socket);
            }
            if let Some(url) = &entry_ref.relay_url {
                let url: RelayUrl = url.parse().map_err(|e| {
                    self.config
                        .error_at(entry.span(), format!("invalid relay_url: {e}"))
                })?;
                addr = addr.with_relay_url(url);
            }
            return Ok(addr);
        }
        if server.starts_with("endpoint") || server.len() == 64 {
            return Ok(net::parse_server(server)?);
        }
        Err(ClientError::UnknownServer(server.to_string()))
    }

    /// Connects to a server. The TLS handshake proves the server holds the
    /// pinned EndpointId.
    pub async fn connect(&self, server: &EndpointAddr) -> Result<Connection, ClientError> {
        let id = server.id;
        match tokio::time::timeout(
            CONNECT_TIMEOUT,
            self.endpoint.connect(server.clone(), net::ALPN),
        )
        .await
        {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(e)) => Err(ClientError::Connect {
                server: id,
                reason: e.to_string(),
            }),
            Err(_) => Err(ClientError::Connect {
                server: id,
                reason: format!("no answer within {CONNECT_TIMEOUT:?}"),
            }),
        }
    }

    /// Opens a session on a connection: a new stream with its hello. Each
    /// session has its own device handles on the server.
    pub async fn session(
        &self,
        connection: &Connection,
    ) -> Result<(LinkClient, mpsc::Receiver<Event>), ClientError> {
        let opened = async {
            let (send, recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
            LinkClient::start(recv, send, SOFTWARE)
                .await
                .map_err(|e| match e {
                    LinkError::Closed => "connection closed".to_string(),
                    other => other.to_string(),
                })
        };
        match opened.await {
            Ok(session) => Ok(session),
            Err(reason) => Err(self.explain_close(connection, reason).await),
        }
    }

    /// Turns a failed session into the server's own reason when it gave one.
    async fn explain_close(&self, connection: &Connection, fallback: String) -> ClientError {
        let server = connection.remote_id();
        let reason = tokio::time::timeout(Duration::from_secs(2), connection.closed())
            .await
            .ok();
        match reason {
            Some(ConnectionError::ApplicationClosed(close))
                if close.error_code == close::NOT_APPROVED.into() =>
            {
                ClientError::NotApproved {
                    server,
                    client: self.id(),
                    reason: String::from_utf8_lossy(&close.reason).into_owned(),
                }
            }
            Some(ConnectionError::ApplicationClosed(close)) => ClientError::Session {
                server,
                reason: String::from_utf8_lossy(&close.reason).into_owned(),
            },
            _ => ClientError::Session {
                server,
                reason: fallback,
            },
        }
    }

    /// Closes the endpoint, telling servers goodbye.
    pub async fn shutdown(self) {
        let _ = tokio::time::timeout(Duration::from_secs(3), self.endpoint.close()).await;
    }
}

/// Lists a session's devices.
pub async fn list_devices(session: &LinkClient) -> Result<Vec<DeviceInfo>, UsbError> {
    match session.request(Request::ListDevices).await? {
        Reply::Devices(devices) => Ok(devices),
        other => Err(UsbError::Protocol(format!(
            "expected a device list, got {other:?}"
        ))),
    }
}

/// Opens the device `key` on a session: its handle and current listing.
pub async fn open_device(
    session: &LinkClient,
    key: &DeviceKey,
) -> Result<(Handle, DeviceInfo), UsbError> {
    match session.request(Request::Open { key: key.clone() }).await? {
        Reply::Opened { handle, device } => Ok((handle, device)),
        other => Err(UsbError::Protocol(format!(
            "expected an opened device, got {other:?}"
        ))),
    }
}

/// Picks a device by stable key, bus path (the USB/IP busid) or VID:PID.
pub fn pick_device<'a>(
    devices: &'a [DeviceInfo],
    spec: &str,
) -> Result<&'a DeviceInfo, ClientError> {
    let named = named_by(devices, |d| &d.key, spec);
    // A VID:PID that several devices share names none of them.
    let [one] = named.as_slice() else {
        return Err(ClientError::NoSuchDevice {
            spec: spec.to_string(),
            available: if devices.is_empty() {
                "no devices".into()
            } else {
                devices
                    .iter()
                    .map(|d| d.key.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        });
    };
    Ok(one)
}

/// The items whose device key `spec` names, read one way for `attach` and
/// `detach`: the whole key, else its bus path, else its VID:PID; all items
/// of the first reading that matches any.
pub fn named_by<'a, T>(items: &'a [T], key: impl Fn(&T) -> &DeviceKey, spec: &str) -> Vec<&'a T> {
    let ids = spec.to_ascii_lowercase();
    let readings: [&dyn Fn(&DeviceKey) -> bool; 3] =
        [&|k| k.to_string() == spec, &|k| k.bus_path == spec, &|k| {
            format!("{:04x}:{:04x}", k.vid, k.pid) == ids
        }];
    readings
        .iter()
        .map(|reading| items.iter().filter(|i| reading(key(i))).collect::<Vec<_>>())
        .find(|matched| !matched.is_empty())
        .unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn devices_are_picked_by_key_bus_path_or_unique_ids() {
        let zero = p2p_usb_common_test_device("1-1", 0x0525, 0xa4a0);
        let kbd = p2p_usb_common_test_device("1-2", 0x0525, 0xa4ac);
        let devices = vec![zero.clone(), kbd.clone()];
        assert_eq!(pick_device(&devices, "1-2").unwrap().key, kbd.key);
        assert_eq!(
            pick_device(&devices, &zero.key.to_string()).unwrap().key,
            zero.key
        );
        assert_eq!(pick_device(&devices, "0525:A4AC").unwrap().key, kbd.key);
        let err = pick_device(&devices, "9-9").unwrap_err().to_string();
        assert!(
            err.contains("1-1/0525:a4a0") && err.contains("1-2/0525:a4ac"),
            "{err}"
        );
    }

    pub(crate) fn p2p_usb_common_test_device(bus_path: &str, vid: u16, pid: u16) -> DeviceInfo {
        use p2p_usb_common::proto::*;
        DeviceInfo {
            key: DeviceKey {
                bus_path: bus_path.into(),
                vid,
                pid,
                serial: None,
            },
            bus_number: 1,
            address: 2,
            speed: Speed::High,
            descriptor: DeviceDescriptor {
                usb_version: 0x200,
                class: 0,
                subclass: 0,
                protocol: 0,
                max_packet_size0: 64,
                vendor_id: vid,
                product_id: pid,
                device_version: 0x100,
                manufacturer_index: 0,
                product_index: 0,
                serial_index: 0,
                num_configurations: 1,
                raw: Default::default(),
            },
            active_configuration: 1,
            configurations: vec![],
            manufacturer: None,
            product: None,
            serial: None,
        }
    }
}
