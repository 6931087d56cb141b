//! What every backend needs to know about a transfer before touching a device:
//! which kind of endpoint it targets (taken from the descriptors of the
//! current alternate setting, never guessed) and whether it is well-formed;
//! and how its single reply travels back to the link that asked.

use std::collections::HashMap;

use p2p_usb_common::proto::{
    Completion, DeviceInfo, EndpointType, MAX_TRANSFER_LEN, Message, Reply, RequestId, Transfer,
    TransferData, UsbError,
};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

/// The endpoint a transfer resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedEndpoint {
    pub address: u8,
    pub kind: EndpointType,
    /// The interface owning the endpoint; `None` for endpoint 0.
    pub interface: Option<u8>,
    pub max_packet_size: usize,
}

/// Finds the endpoint `transfer` targets in the active configuration with the
/// given alternate settings (`alts[interface] = alt`, missing = 0) and checks
/// the transfer against it.
pub fn resolve(
    info: &DeviceInfo,
    alts: &HashMap<u8, u8>,
    transfer: &Transfer,
) -> Result<ResolvedEndpoint, UsbError> {
    if transfer.data.len() > MAX_TRANSFER_LEN {
        return Err(UsbError::Invalid(format!(
            "transfer of {} bytes exceeds the limit of {MAX_TRANSFER_LEN}",
            transfer.data.len()
        )));
    }
    if transfer.endpoint & 0x7f == 0 {
        let setup = transfer
            .setup
            .ok_or_else(|| UsbError::Invalid("control transfer without a setup packet".into()))?;
        if setup.is_in() != transfer.data.is_in() && !transfer.data.is_empty() {
            return Err(UsbError::Invalid(
                "data direction contradicts the setup packet".into(),
            ));
        }
        if transfer.data.len() > u32::from(setup.length) {
            return Err(UsbError::Invalid(format!(
                "control data of {} bytes exceeds wLength {}",
                transfer.data.len(),
                setup.length
            )));
        }
        return Ok(ResolvedEndpoint {
            address: 0,
            kind: EndpointType::Control,
            interface: None,
            max_packet_size: usize::from(info.descriptor.max_packet_size0),
        });
    }
    if transfer.setup.is_some() {
        return Err(UsbError::Invalid(format!(
            "setup packet on non-control endpoint {:#04x}",
            transfer.endpoint
        )));
    }
    let dir_in = transfer.endpoint & 0x80 != 0;
    if dir_in != transfer.data.is_in() {
        return Err(UsbError::Invalid(format!(
            "endpoint {:#04x} is {} but the transfer carries {} data",
            transfer.endpoint,
            if dir_in { "IN" } else { "OUT" },
            if transfer.data.is_in() { "IN" } else { "OUT" },
        )));
    }
    let config = info
        .active_config()
        .ok_or_else(|| UsbError::Invalid("device is not configured".into()))?;
    for interface in &config.interfaces {
        let alt = alts.get(&interface.number).copied().unwrap_or(0);
        let Some(setting) = interface.alt_settings.iter().find(|a| a.alternate == alt) else {
            continue;
        };
        if let Some(ep) = setting
            .endpoints
            .iter()
            .find(|e| e.address == transfer.endpoint)
        {
            let kind = ep.transfer_type();
            if kind == EndpointType::Isochronous {
                return Err(UsbError::Unsupported(format!(
                    "isochronous endpoint {:#04x}: isochronous transfers are not supported",
                    ep.address
                )));
            }
            return Ok(ResolvedEndpoint {
                address: ep.address,
                kind,
                interface: Some(interface.number),
                max_packet_size: ep.packet_size().max(1),
            });
        }
    }
    Err(UsbError::Invalid(format!(
        "endpoint {:#04x} does not exist in the current configuration and alternate settings",
        transfer.endpoint
    )))
}

/// The answer to a transfer that completed on the device. `short_not_ok`
/// turns a short IN into a failure that still carries its data, as the
/// kernel reports it (-EREMOTEIO with the bytes read).
pub fn answer(transfer: &Transfer, completion: Completion) -> Result<Reply, UsbError> {
    match transfer.data {
        TransferData::In { length }
            if transfer.flags.short_not_ok && completion.actual_length < length =>
        {
            Reply::transfer_failed(UsbError::ShortPacket, completion)
        }
        _ => Ok(Reply::Transferred(completion)),
    }
}

/// A message on its way to a link's writer. A transfer's reply carries the
/// share of the link's in-flight budget the transfer held, so the budget
/// comes back once the reply is written, not when it is queued: a peer that
/// stops reading cannot make the helper hold more than the budget.
#[derive(Debug)]
pub struct Outgoing {
    pub message: Message,
    _budget: Option<OwnedSemaphorePermit>,
}

impl From<Message> for Outgoing {
    fn from(message: Message) -> Self {
        Outgoing {
            message,
            _budget: None,
        }
    }
}

impl serde::Serialize for Outgoing {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.message.serialize(serializer)
    }
}

/// A reply the link had no room for, with its sink.
pub type Unsent = (ReplySink, Result<Reply, UsbError>);

/// Where the reply to one transfer goes: the outgoing queue of the link that
/// submitted it, with the budget the transfer holds.
#[derive(Debug)]
pub struct ReplySink {
    pub id: RequestId,
    outgoing: mpsc::Sender<Outgoing>,
    budget: Option<OwnedSemaphorePermit>,
    /// The peer reads `Reply::PartlyTransferred`; others get its error.
    partial: bool,
}

impl ReplySink {
    /// A sink for request `id` on the link behind `outgoing`.
    pub fn new(
        id: RequestId,
        outgoing: mpsc::Sender<Outgoing>,
        budget: Option<OwnedSemaphorePermit>,
    ) -> Self {
        ReplySink {
            id,
            outgoing,
            budget,
            partial: false,
        }
    }

    /// Lets a transfer that fails part way be answered with what moved
    /// (the peer named `CAP_PARTIAL_TRANSFERS`).
    pub fn with_partial_replies(mut self, partial: bool) -> Self {
        self.partial = partial;
        self
    }

    fn into_outgoing(self, body: Result<Reply, UsbError>) -> (mpsc::Sender<Outgoing>, Outgoing) {
        let body = match body {
            Ok(Reply::PartlyTransferred { error, .. }) if !self.partial => Err(error),
            body => body,
        };
        let message = Message::Reply { id: self.id, body };
        (
            self.outgoing,
            Outgoing {
                message,
                _budget: self.budget,
            },
        )
    }

    /// Queues the transfer's result, waiting if the link is slow; a closed
    /// link is fine (nobody is left to tell).
    pub async fn send(self, result: Result<Completion, UsbError>) {
        self.send_reply(result.map(Reply::Transferred)).await;
    }

    /// Queues any answer to the transfer, such as a partial one
    /// ([`Reply::transfer_failed`]).
    pub async fn send_reply(self, body: Result<Reply, UsbError>) {
        let (outgoing, reply) = self.into_outgoing(body);
        let _ = outgoing.send(reply).await;
    }

    /// Queues the answer if the link has room now; otherwise hands both back
    /// (boxed: a `Reply` is large, and a full link is the rare case).
    pub fn try_send(self, body: Result<Reply, UsbError>) -> Result<(), Box<Unsent>> {
        match self.outgoing.clone().try_reserve_owned() {
            Ok(slot) => {
                let (_, reply) = self.into_outgoing(body);
                slot.send(reply);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(Box::new((self, body))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::zero;
    use bytes::Bytes;
    use p2p_usb_common::proto::{SetupPacket, TransferFlags};

    fn transfer(endpoint: u8, data: TransferData) -> Transfer {
        Transfer {
            handle: 1,
            endpoint,
            setup: None,
            data,
            flags: TransferFlags::default(),
            timeout_ms: None,
        }
    }

    #[test]
    fn endpoint_type_comes_from_descriptors() {
        let mut info = zero::device_info(2);
        info.active_configuration = zero::CONFIG_SOURCE_SINK;
        let alts = HashMap::new();
        let ep = resolve(
            &info,
            &alts,
            &transfer(0x81, TransferData::In { length: 512 }),
        )
        .unwrap();
        assert_eq!(ep.kind, EndpointType::Bulk);
        assert_eq!(ep.interface, Some(0));
        assert_eq!(ep.max_packet_size, 512);

        let wrong_dir = resolve(
            &info,
            &alts,
            &transfer(0x81, TransferData::Out(Bytes::new())),
        );
        assert!(matches!(wrong_dir, Err(UsbError::Invalid(_))));
        let missing = resolve(
            &info,
            &alts,
            &transfer(0x85, TransferData::In { length: 1 }),
        );
        assert!(matches!(missing, Err(UsbError::Invalid(_))));
    }

    #[test]
    fn isochronous_alt_setting_is_refused_clearly() {
        let mut info = zero::device_info(2);
        info.active_configuration = zero::CONFIG_SOURCE_SINK;
        let alts = HashMap::from([(0, 1)]);
        let err = resolve(
            &info,
            &alts,
            &transfer(0x82, TransferData::In { length: 1024 }),
        )
        .unwrap_err();
        assert!(matches!(err, UsbError::Unsupported(_)), "{err}");
    }

    #[test]
    fn control_transfers_need_a_consistent_setup() {
        let info = zero::device_info(2);
        let mut t = transfer(0x80, TransferData::In { length: 18 });
        assert!(resolve(&info, &HashMap::new(), &t).is_err(), "no setup");
        t.setup = Some(SetupPacket::from_bytes([0x80, 6, 0, 1, 0, 0, 18, 0]));
        assert_eq!(
            resolve(&info, &HashMap::new(), &t).unwrap().kind,
            EndpointType::Control
        );
        t.data = TransferData::In { length: 64 };
        assert!(
            resolve(&info, &HashMap::new(), &t).is_err(),
            "longer than wLength"
        );
    }

    #[test]
    fn oversized_transfers_are_refused() {
        let info = zero::device_info(2);
        let t = transfer(
            0x81,
            TransferData::In {
                length: MAX_TRANSFER_LEN + 1,
            },
        );
        assert!(matches!(
            resolve(&info, &HashMap::new(), &t),
            Err(UsbError::Invalid(_))
        ));
    }
}
