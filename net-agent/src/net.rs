//! iroh endpoints as configured in `[iroh]`: relays, bind address, address
//! lookup, and the protocol's ALPN. Both the server agent and the client build
//! their endpoint here.

use std::net::SocketAddr;

use iroh::address_lookup::{DnsAddressLookup, PkarrPublisher, PkarrResolver};
use iroh::endpoint::{PortmapperConfig, presets};
use iroh::{
    Endpoint, EndpointAddr, EndpointId, RelayConfig, RelayMap, RelayMode, RelayUrl, SecretKey,
};
use iroh_tickets::endpoint::EndpointTicket;
use p2p_usb_common::config::{ConfigError, ConfigFile, IrohSection, RelayMode as RelaySetting};

/// The ALPN of this protocol; a peer speaking anything else is refused in the
/// TLS handshake.
pub const ALPN: &[u8] = b"p2p-usb/1";

/// QUIC application close codes the server uses, so clients can say why.
pub mod close {
    /// The client is not (or no longer) approved.
    pub const NOT_APPROVED: u32 = 403;
    /// The server is shutting down.
    pub const SHUTDOWN: u32 = 503;
    /// Normal end of a session.
    pub const DONE: u32 = 0;
}

/// Why an endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot bind the iroh endpoint on {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: String },
}

/// The relay URLs of a `custom` configuration, checked, with file:line errors.
pub fn relay_urls<T>(
    file: &ConfigFile<T>,
    iroh: &IrohSection,
) -> Result<Vec<RelayUrl>, ConfigError> {
    iroh.relay_urls
        .iter()
        .map(|url| {
            url.get_ref().parse::<RelayUrl>().map_err(|e| {
                file.error_at(
                    url.span(),
                    format!("invalid relay URL {:?}: {e}", url.get_ref()),
                )
            })
        })
        .collect()
}

/// The TLS provider for QUIC and relay connections, with ChaCha20-Poly1305
/// preferred over AES-GCM. The typical server, a Raspberry Pi 4, has no AES
/// instructions: software AES-GCM runs there (and on emulated CPUs) at a
/// fraction of ChaCha20's speed, while CPUs with AES instructions still do
/// ChaCha20 at well over a gigabyte per second. AES-128-GCM stays available:
/// QUIC protects its initial packets with it.
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
    std::sync::Arc::new(provider)
}

/// Builds and binds an endpoint. `accept` adds our ALPN so the endpoint can
/// accept connections (the server); clients only dial.
pub async fn bind_endpoint(
    iroh: &IrohSection,
    relays: &[RelayUrl],
    key: SecretKey,
    accept: bool,
) -> Result<Endpoint, NetError> {
    let mut builder = Endpoint::builder(presets::Minimal)
        .crypto_provider(crypto_provider())
        .secret_key(key);
    builder = match iroh.relay_mode.get_ref() {
        RelaySetting::Default => builder.relay_mode(RelayMode::Default),
        RelaySetting::Disabled => builder.relay_mode(RelayMode::Disabled),
        RelaySetting::Custom => {
            // No QUIC address discovery port assumed: a self-hosted relay
            // need not run one.
            let map: RelayMap = relays
                .iter()
                .map(|url| RelayConfig::new(url.clone(), None))
                .collect();
            builder.relay_mode(RelayMode::Custom(map))
        }
    };
    builder = builder.clear_ip_transports();
    let direct = *iroh.direct_connections.get_ref();
    if direct {
        builder = builder
            .bind_addr(iroh.bind_addr)
            .map_err(|e| NetError::Bind {
                addr: iroh.bind_addr,
                reason: e.to_string(),
            })?;
    }
    if iroh.bind_addr.ip().is_loopback() || !direct {
        // Port mapping (UPnP, NAT-PMP) is useless without a reachable socket.
        builder = builder.portmapper_config(PortmapperConfig::Disabled);
    }
    if iroh.dns_discovery {
        builder = builder
            .address_lookup(PkarrPublisher::n0_dns())
            .address_lookup(PkarrResolver::n0_dns())
            .address_lookup(DnsAddressLookup::n0_dns());
    }
    if iroh.local_discovery {
        builder = builder.address_lookup(iroh_mdns_address_lookup::MdnsAddressLookup::builder());
    }
    if accept {
        builder = builder.alpns(vec![ALPN.to_vec()]);
    }
    builder.bind().await.map_err(|e| NetError::Bind {
        addr: iroh.bind_addr,
        reason: e.to_string(),
    })
}

/// The shareable ticket of an endpoint: its id, direct addresses and relay.
pub fn ticket(endpoint: &Endpoint) -> String {
    EndpointTicket::new(endpoint.addr()).to_string()
}

/// Why a server given by the user could not be understood.
#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    #[error("invalid ticket: {0}")]
    Ticket(String),
    #[error("invalid EndpointId {input:?}: {reason} (expected 64 lowercase hex characters)")]
    Id { input: String, reason: String },
}

/// Parses an EndpointId as printed by `id` commands and logs.
pub fn parse_endpoint_id(input: &str) -> Result<EndpointId, AddrError> {
    input
        .trim()
        .parse::<EndpointId>()
        .map_err(|e| AddrError::Id {
            input: input.to_string(),
            reason: e.to_string(),
        })
}

/// A ticket (`endpoint...`) or a bare EndpointId.
pub fn parse_server(input: &str) -> Result<EndpointAddr, AddrError> {
    let input = input.trim();
    if input.starts_with("endpoint") {
        let ticket: EndpointTicket = input
            .parse()
            .map_err(|e: iroh_tickets::ParseError| AddrError::Ticket(e.to_string()))?;
        return Ok(EndpointAddr::from(ticket));
    }
    parse_endpoint_id(input).map(EndpointAddr::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chacha20_is_preferred_and_aes_128_kept_for_quic() {
        let suites: Vec<_> = crypto_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            suites[0],
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        );
        assert!(suites.contains(&rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
    }

    #[tokio::test]
    async fn endpoints_with_this_provider_connect() {
        let bind = || async move {
            Endpoint::builder(presets::Minimal)
                .crypto_provider(crypto_provider())
                .secret_key(SecretKey::generate())
                .relay_mode(RelayMode::Disabled)
                .portmapper_config(PortmapperConfig::Disabled)
                .clear_ip_transports()
                .bind_addr(SocketAddr::from(([127, 0, 0, 1], 0)))
                .unwrap()
                .alpns(vec![ALPN.to_vec()])
                .bind()
                .await
                .unwrap()
        };
        let server = bind().await;
        let client = bind().await;
        let addr = EndpointAddr::new(server.id()).with_ip_addr(server.bound_sockets()[0]);
        let accept = tokio::spawn({
            let server = server.clone();
            async move {
                server
                    .accept()
                    .await
                    .unwrap()
                    .accept()
                    .unwrap()
                    .await
                    .unwrap()
            }
        });
        let connection = client.connect(addr, ALPN).await.unwrap();
        let accepted = accept.await.unwrap();
        assert_eq!(accepted.remote_id(), client.id());
        connection.close(0u32.into(), b"");
        client.close().await;
        server.close().await;
    }

    #[test]
    fn ids_and_tickets_parse() {
        let id = SecretKey::generate().public();
        assert_eq!(parse_endpoint_id(&id.to_string()).unwrap(), id);
        assert!(parse_endpoint_id(&id.to_string().to_uppercase()).is_err());
        assert!(parse_endpoint_id("abc").is_err());
        let addr = EndpointAddr::new(id).with_ip_addr("127.0.0.1:4433".parse().unwrap());
        let ticket = EndpointTicket::new(addr.clone()).to_string();
        assert_eq!(parse_server(&ticket).unwrap(), addr);
        assert_eq!(
            parse_server(&id.to_string()).unwrap(),
            EndpointAddr::new(id)
        );
        assert!(matches!(
            parse_server("endpointgarbage"),
            Err(AddrError::Ticket(_))
        ));
    }
}
