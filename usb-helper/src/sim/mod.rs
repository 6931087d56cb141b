//! Simulated USB devices for tests, the demo and benchmarks, behaving like
//! real ones: descriptors answered on endpoint 0, per-endpoint FIFO queues,
//! NAK (pending) until data is there, stalls until cleared, unplug and replug
//! with new bus addresses, and completion delays.
//!
//! Transfers are simulated inline, on the helper's own runtime, so a
//! simulated device costs no more thread hand-offs than a real one whose
//! completions arrive from the kernel. A clock task drives what happens with
//! time (keyboard pacing, timeouts, delayed completions, replugs). A "hung USB
//! stack" ([`zero::control::FREEZE`]) blocks that clock while it holds the
//! bus, which the helper's watchdog must notice.

pub mod keyboard;
pub mod zero;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use p2p_usb_common::config::{SimDeviceKind, SimSection};
use p2p_usb_common::descriptors::{self, kind};
use p2p_usb_common::proto::{
    Completion, DeviceInfo, DeviceKey, Reply, RequestId, SetupPacket, Transfer, TransferData,
    UsbError, std_request,
};
use tokio::sync::{Notify, broadcast, mpsc};
use tokio::time::Instant;

use crate::backend::{BackendEvent, HEALTH_TIMEOUT, HOTPLUG_QUEUE};
use crate::transfer::{self, ReplySink};

/// Side effects a vendor request asks of the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Halt this endpoint address.
    Stall(u8),
    /// Let the next transfer on `endpoint` move at most `bytes`, and halt the
    /// endpoint if that cut it short.
    StallAfter { endpoint: u8, bytes: usize },
    /// Unplug, replug after this many milliseconds.
    Unplug(u64),
    /// Delay every completion by this many milliseconds.
    Delay(u64),
    /// Block the USB thread for this many seconds.
    Freeze(u64),
}

/// The simulated bus.
pub struct SimBackend {
    shared: Arc<Shared>,
}

/// What the backend, its devices and the clock task share.
struct Shared {
    bus: Mutex<Bus>,
    /// Wakes the clock when a new deadline comes before the one it sleeps to.
    clock: Notify,
    snapshot: Arc<Mutex<Vec<DeviceInfo>>>,
    events: broadcast::Sender<BackendEvent>,
}

impl Shared {
    fn bus(&self) -> std::sync::MutexGuard<'_, Bus> {
        self.bus.lock().expect("sim bus lock")
    }

    /// Runs `f` on the bus, then wakes the clock if it now has to act sooner.
    fn with_bus<T>(&self, f: impl FnOnce(&mut Bus) -> T) -> T {
        let mut bus = self.bus();
        let result = f(&mut bus);
        let due = bus.next_wakeup();
        let sooner = match (due, bus.clock_armed) {
            (Some(due), Some(armed)) => due < armed,
            (Some(_), None) => true,
            (None, _) => false,
        };
        drop(bus);
        if sooner {
            self.clock.notify_one();
        }
        result
    }
}

/// An open simulated device.
pub struct SimDevice {
    shared: Arc<Shared>,
    open: u64,
    info: Arc<Mutex<DeviceInfo>>,
}

impl SimBackend {
    /// Plugs in the configured devices and starts the clock task. Must run
    /// inside the tokio runtime.
    pub fn start(config: &SimSection) -> SimBackend {
        let (events, _) = broadcast::channel(HOTPLUG_QUEUE);
        let snapshot = Arc::new(Mutex::new(Vec::new()));
        let mut bus = Bus {
            units: Vec::new(),
            snapshot: snapshot.clone(),
            events: events.clone(),
            next_open: 1,
            next_address: 2,
            freeze: None,
            clock_armed: None,
            base_delay: Duration::from_millis(config.completion_delay_ms),
        };
        for kind in &config.devices {
            let behaviour = match kind {
                SimDeviceKind::Zero => Behaviour::Zero(zero::Zero::default()),
                SimDeviceKind::Keyboard => {
                    Behaviour::Keyboard(keyboard::Keyboard::new(&config.keyboard_text))
                }
            };
            bus.plug_new(behaviour);
        }
        bus.publish();
        let shared = Arc::new(Shared {
            bus: Mutex::new(bus),
            clock: Notify::new(),
            snapshot,
            events,
        });
        tokio::spawn(clock(shared.clone()));
        SimBackend { shared }
    }

    /// Devices currently plugged in.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.shared.snapshot.lock().expect("snapshot lock").clone()
    }

    /// Hotplug events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<BackendEvent> {
        self.shared.events.subscribe()
    }

    /// Opens a device for exclusive use.
    pub async fn open(&self, key: &DeviceKey) -> Result<SimDevice, UsbError> {
        let (open, info) = self.shared.with_bus(|bus| bus.open(key))?;
        Ok(SimDevice {
            shared: self.shared.clone(),
            open,
            info,
        })
    }

    /// True if the bus can be taken within [`HEALTH_TIMEOUT`]: a hung
    /// simulated USB stack holds it.
    pub async fn healthy(&self) -> bool {
        let shared = self.shared.clone();
        let probe = tokio::task::spawn_blocking(move || drop(shared.bus()));
        matches!(
            tokio::time::timeout(HEALTH_TIMEOUT, probe).await,
            Ok(Ok(()))
        )
    }
}

impl SimDevice {
    /// The device's current listing.
    pub fn info(&self) -> DeviceInfo {
        self.info.lock().expect("info lock").clone()
    }

    /// Queues a transfer; what can complete now completes now.
    pub fn submit(&self, transfer: Transfer, reply: ReplySink) {
        self.shared
            .with_bus(|bus| bus.submit(self.open, transfer, reply));
    }

    /// Cancels a pending transfer.
    pub fn cancel(&self, id: RequestId) {
        self.shared.with_bus(|bus| bus.cancel(self.open, id));
    }

    /// SET_CONFIGURATION.
    pub async fn set_configuration(&self, value: u8) -> Result<(), UsbError> {
        self.shared
            .with_bus(|bus| bus.set_configuration(self.open, value))
    }

    /// SET_INTERFACE.
    pub async fn set_interface(&self, interface: u8, alt: u8) -> Result<(), UsbError> {
        self.shared.with_bus(|bus| match bus.unit_for(self.open) {
            None => Err(UsbError::NoDevice),
            Some(unit) => set_interface(unit, interface, alt),
        })
    }

    /// CLEAR_FEATURE(ENDPOINT_HALT).
    pub async fn clear_halt(&self, endpoint: u8) -> Result<(), UsbError> {
        self.shared.with_bus(|bus| match bus.unit_for(self.open) {
            None => Err(UsbError::NoDevice),
            Some(unit) => {
                unit.halted.remove(&endpoint);
                unit.pump(Instant::now());
                Ok(())
            }
        })
    }

    /// Port reset.
    pub async fn reset(&self) -> Result<(), UsbError> {
        self.shared.with_bus(|bus| match bus.unit_for(self.open) {
            None => Err(UsbError::NoDevice),
            Some(unit) => {
                unit.fail_pending(UsbError::Cancelled, None);
                unit.forget_endpoint_state();
                unit.behaviour.reset();
                Ok(())
            }
        })
    }

    /// Releases the device; pending transfers end with `Cancelled`.
    pub async fn close(&self) {
        self.shared.with_bus(|bus| {
            if let Some(unit) = bus.unit_for(self.open) {
                unit.fail_pending(UsbError::Cancelled, None);
                unit.opened_by = None;
                unit.forget_endpoint_state();
            }
        });
    }
}

/// Drives the bus through time, for as long as the process runs.
async fn clock(shared: Arc<Shared>) {
    loop {
        let due = {
            let mut bus = shared.bus();
            let due = bus.next_wakeup();
            bus.clock_armed = due;
            due
        };
        tokio::select! {
            _ = sleep_until(due) => {}
            _ = shared.clock.notified() => {}
        }
        shared.bus().tick(Instant::now());
    }
}

enum Behaviour {
    Zero(zero::Zero),
    Keyboard(keyboard::Keyboard),
}

impl Behaviour {
    fn fresh_info(&self, address: u8) -> DeviceInfo {
        match self {
            Behaviour::Zero(_) => zero::device_info(address),
            Behaviour::Keyboard(_) => keyboard::device_info(address),
        }
    }

    fn string(&self, index: u8) -> Option<&'static str> {
        match self {
            Behaviour::Zero(_) => zero::string(index),
            Behaviour::Keyboard(_) => keyboard::string(index),
        }
    }

    fn reset(&mut self) {
        if let Behaviour::Zero(z) = self {
            z.reset();
        }
    }
}

struct Pending {
    transfer: Transfer,
    reply: ReplySink,
    deadline: Option<Instant>,
}

struct Delivery {
    ready_at: Instant,
    reply: ReplySink,
    result: Result<Reply, UsbError>,
}

/// An endpoint's delivery task and how many replies it still holds.
struct Outbox {
    queue: mpsc::UnboundedSender<Delivery>,
    backlog: Arc<std::sync::atomic::AtomicUsize>,
}

/// One simulated device and its bus-side state.
struct Unit {
    behaviour: Behaviour,
    info: Arc<Mutex<DeviceInfo>>,
    plugged: bool,
    replug_at: Option<Instant>,
    opened_by: Option<u64>,
    alts: HashMap<u8, u8>,
    halted: HashSet<u8>,
    /// Endpoints whose next transfer stops part way with a stall, and the
    /// bytes it moves first.
    stall_after: HashMap<u8, usize>,
    queues: BTreeMap<u8, VecDeque<Pending>>,
    /// One ordered delivery queue per endpoint keeps replies FIFO per
    /// endpoint even when completions are delayed or the link is full.
    outboxes: HashMap<u8, Outbox>,
    delay: Duration,
}

impl Unit {
    fn info(&self) -> DeviceInfo {
        self.info.lock().expect("info lock").clone()
    }

    /// Back to alternate setting 0 everywhere, no halted endpoint and no
    /// armed cut: what a reset, a configuration change, a close or a new
    /// plug-in leaves behind.
    fn forget_endpoint_state(&mut self) {
        self.alts.clear();
        self.halted.clear();
        self.stall_after.clear();
    }

    fn deliver(&mut self, endpoint: u8, reply: ReplySink, result: Result<Reply, UsbError>) {
        use std::sync::atomic::Ordering;
        let outbox = self.outboxes.entry(endpoint).or_insert_with(|| {
            let (queue, mut rx) = mpsc::unbounded_channel::<Delivery>();
            let backlog = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let drained = backlog.clone();
            tokio::spawn(async move {
                while let Some(delivery) = rx.recv().await {
                    if delivery.ready_at > Instant::now() {
                        tokio::time::sleep_until(delivery.ready_at).await;
                    }
                    delivery.reply.send_reply(delivery.result).await;
                    drained.fetch_sub(1, Ordering::AcqRel);
                }
            });
            Outbox { queue, backlog }
        });
        // Straight onto the link when nothing is queued ahead of it on this
        // endpoint; otherwise behind the others, in order.
        let (reply, result) = if self.delay.is_zero() && outbox.backlog.load(Ordering::Acquire) == 0
        {
            match reply.try_send(result) {
                Ok(()) => return,
                Err(unsent) => *unsent,
            }
        } else {
            (reply, result)
        };
        outbox.backlog.fetch_add(1, Ordering::AcqRel);
        let _ = outbox.queue.send(Delivery {
            ready_at: Instant::now() + self.delay,
            reply,
            result,
        });
    }

    /// Ends every pending transfer (on `only` endpoints, or all) with `error`.
    fn fail_pending(&mut self, error: UsbError, only: Option<&[u8]>) {
        let endpoints: Vec<u8> = self
            .queues
            .keys()
            .copied()
            .filter(|ep| only.is_none_or(|list| list.contains(ep)))
            .collect();
        for ep in endpoints {
            let drained: Vec<Pending> = self
                .queues
                .get_mut(&ep)
                .map(|q| q.drain(..).collect())
                .unwrap_or_default();
            for pending in drained {
                self.deliver(ep, pending.reply, Err(error.clone()));
            }
        }
    }

    /// Completes what can complete at the head of each endpoint queue and
    /// expires transfers past their deadline.
    fn pump(&mut self, now: Instant) {
        let config = self.info.lock().expect("info lock").active_configuration;
        let endpoints: Vec<u8> = self.queues.keys().copied().collect();
        for ep in endpoints {
            while let Some(queue) = self.queues.get_mut(&ep) {
                let Some(head) = queue.front() else { break };
                // An armed cut lets the device move only `limit` bytes of a
                // transfer that asks for more.
                let limit = self
                    .stall_after
                    .get(&ep)
                    .map(|&limit| limit as u32)
                    .filter(|&limit| limit < head.transfer.data.len());
                let result = if self.halted.contains(&ep) {
                    Poll::Ready(Err(UsbError::Stall))
                } else {
                    let limited = limit.map(|limit| limited_to(&head.transfer, limit));
                    let transfer = limited.as_ref().unwrap_or(&head.transfer);
                    match &mut self.behaviour {
                        Behaviour::Zero(z) => z.data(config, transfer),
                        Behaviour::Keyboard(k) => k.data(transfer, now),
                    }
                };
                let Poll::Ready(result) = result else { break };
                let pending = queue.pop_front().expect("head exists");
                let result = match result {
                    Ok(completion) => {
                        let armed = self.stall_after.remove(&ep).is_some();
                        if armed && Some(completion.actual_length) == limit {
                            // Cut off before the end: the endpoint halts.
                            self.halted.insert(ep);
                            Reply::transfer_failed(UsbError::Stall, completion)
                        } else {
                            transfer::answer(&pending.transfer, completion)
                        }
                    }
                    Err(e) => Err(e),
                };
                self.deliver(ep, pending.reply, result);
            }
            let expired: VecDeque<Pending> = match self.queues.get_mut(&ep) {
                Some(queue) if queue.iter().any(|p| p.deadline.is_some_and(|d| d <= now)) => {
                    let (expired, kept): (VecDeque<Pending>, VecDeque<Pending>) = queue
                        .drain(..)
                        .partition(|p| p.deadline.is_some_and(|d| d <= now));
                    *queue = kept;
                    expired
                }
                _ => VecDeque::new(),
            };
            for pending in expired {
                self.deliver(ep, pending.reply, Err(UsbError::Timeout));
            }
        }
    }

    fn next_wakeup(&self) -> Option<Instant> {
        let deadlines = self.queues.values().flatten().filter_map(|p| p.deadline);
        let keyboard = match &self.behaviour {
            Behaviour::Keyboard(k) if self.queues.values().any(|q| !q.is_empty()) => {
                k.next_wakeup()
            }
            _ => None,
        };
        deadlines.chain(keyboard).chain(self.replug_at).min()
    }

    /// Endpoint 0: standard requests the device answers itself, then class
    /// and vendor requests.
    fn control(
        &mut self,
        setup: &SetupPacket,
        data: &TransferData,
    ) -> Result<(Completion, Option<Effect>), UsbError> {
        let length = data.len();
        let reply = |bytes: &[u8]| {
            let n = bytes.len().min(length as usize);
            Ok((
                Completion {
                    actual_length: n as u32,
                    data: Bytes::copy_from_slice(&bytes[..n]),
                },
                None,
            ))
        };
        let done = || {
            Ok((
                Completion {
                    actual_length: 0,
                    data: Bytes::new(),
                },
                None,
            ))
        };
        let info = self.info();
        match (setup.request_type, setup.request) {
            (0x80, std_request::GET_DESCRIPTOR) => {
                let index = setup.value as u8;
                match (setup.value >> 8) as u8 {
                    kind::DEVICE => reply(&info.descriptor.raw),
                    kind::CONFIGURATION => match info.configurations.get(usize::from(index)) {
                        Some(config) => reply(&config.raw),
                        None => Err(UsbError::Stall),
                    },
                    kind::STRING if index == 0 => reply(&[4, kind::STRING, 0x09, 0x04]),
                    kind::STRING => match self.behaviour.string(index) {
                        Some(text) => reply(&descriptors::encode_string(text)),
                        None => Err(UsbError::Stall),
                    },
                    _ => Err(UsbError::Stall),
                }
            }
            (0x81, std_request::GET_DESCRIPTOR) => match &self.behaviour {
                Behaviour::Keyboard(k) => match k.interface_descriptor((setup.value >> 8) as u8) {
                    Some(bytes) => reply(&bytes),
                    None => Err(UsbError::Stall),
                },
                Behaviour::Zero(_) => Err(UsbError::Stall),
            },
            (0x80, std_request::GET_STATUS) => reply(&[0x01, 0x00]),
            (0x81, std_request::GET_STATUS) => reply(&[0, 0]),
            (0x82, std_request::GET_STATUS) => {
                reply(&[u8::from(self.halted.contains(&(setup.index as u8))), 0])
            }
            (0x80, std_request::GET_CONFIGURATION) => reply(&[info.active_configuration]),
            (0x81, std_request::GET_INTERFACE) => {
                reply(&[self.alts.get(&(setup.index as u8)).copied().unwrap_or(0)])
            }
            (0x00, std_request::SET_FEATURE | std_request::CLEAR_FEATURE) => done(),
            (0x02, std_request::SET_FEATURE) if setup.value == std_request::ENDPOINT_HALT => {
                self.halted.insert(setup.index as u8);
                done()
            }
            (0x02, std_request::CLEAR_FEATURE) if setup.value == std_request::ENDPOINT_HALT => {
                self.halted.remove(&(setup.index as u8));
                done()
            }
            _ => match &mut self.behaviour {
                Behaviour::Zero(z) => z.vendor_request(setup, data),
                Behaviour::Keyboard(k) => k.class_request(setup, data).map(|c| (c, None)),
            },
        }
    }
}

/// The simulated bus: all units, on the simulation thread.
struct Bus {
    units: Vec<Unit>,
    snapshot: Arc<Mutex<Vec<DeviceInfo>>>,
    events: broadcast::Sender<BackendEvent>,
    next_open: u64,
    next_address: u8,
    freeze: Option<(Instant, Duration)>,
    /// When the clock task is due to wake next (`None`: only when notified).
    clock_armed: Option<Instant>,
    base_delay: Duration,
}

impl Bus {
    fn plug_new(&mut self, behaviour: Behaviour) {
        let address = self.take_address();
        let info = behaviour.fresh_info(address);
        self.units.push(Unit {
            behaviour,
            info: Arc::new(Mutex::new(info)),
            plugged: true,
            replug_at: None,
            opened_by: None,
            alts: HashMap::new(),
            halted: HashSet::new(),
            stall_after: HashMap::new(),
            queues: BTreeMap::new(),
            outboxes: HashMap::new(),
            delay: self.base_delay,
        });
    }

    fn take_address(&mut self) -> u8 {
        let address = self.next_address;
        self.next_address = if address >= 127 { 2 } else { address + 1 };
        address
    }

    fn publish(&self) {
        *self.snapshot.lock().expect("snapshot lock") = self
            .units
            .iter()
            .filter(|u| u.plugged)
            .map(Unit::info)
            .collect();
    }

    fn next_wakeup(&self) -> Option<Instant> {
        self.units
            .iter()
            .filter_map(Unit::next_wakeup)
            .chain(self.freeze.map(|(at, _)| at))
            .min()
    }

    fn tick(&mut self, now: Instant) {
        if let Some((at, duration)) = self.freeze
            && at <= now
        {
            self.freeze = None;
            tracing::warn!("simulated USB thread hangs for {duration:?}");
            std::thread::sleep(duration);
        }
        let mut arrived = Vec::new();
        for i in 0..self.units.len() {
            if self.units[i].replug_at.is_some_and(|at| at <= now) {
                arrived.push(self.replug(i));
            }
            self.units[i].pump(now);
        }
        if !arrived.is_empty() {
            // The listing first: a connection that missed events reads it to
            // catch up, and must find there what the events say.
            self.publish();
            for info in arrived {
                let _ = self.events.send(BackendEvent::Arrived(info));
            }
        }
    }

    fn unit_for(&mut self, open: u64) -> Option<&mut Unit> {
        self.units
            .iter_mut()
            .find(|u| u.plugged && u.opened_by == Some(open))
    }

    fn cancel(&mut self, open: u64, id: RequestId) {
        let Some(unit) = self.unit_for(open) else {
            return;
        };
        let found = unit.queues.iter_mut().find_map(|(ep, queue)| {
            let at = queue.iter().position(|p| p.reply.id == id)?;
            Some((*ep, queue.remove(at)?))
        });
        if let Some((ep, pending)) = found {
            unit.deliver(ep, pending.reply, Err(UsbError::Cancelled));
        }
    }

    fn open(&mut self, key: &DeviceKey) -> Result<(u64, Arc<Mutex<DeviceInfo>>), UsbError> {
        let open = self.next_open;
        let unit = self
            .units
            .iter_mut()
            .find(|u| u.plugged && u.info().key == *key)
            .ok_or_else(|| UsbError::NotFound(key.to_string()))?;
        if unit.opened_by.is_some() {
            return Err(UsbError::Busy(format!("{key} is already open")));
        }
        self.next_open += 1;
        unit.opened_by = Some(open);
        if let Behaviour::Keyboard(k) = &mut unit.behaviour {
            k.start_typing();
        }
        Ok((open, unit.info.clone()))
    }

    fn submit(&mut self, open: u64, transfer: Transfer, reply: ReplySink) {
        let endpoint = transfer.endpoint;
        let Some(index) = self
            .units
            .iter()
            .position(|u| u.plugged && u.opened_by == Some(open))
        else {
            if let Err(unsent) = reply.try_send(Err(UsbError::NoDevice)) {
                let (reply, result) = *unsent;
                tokio::spawn(reply.send_reply(result));
            }
            return;
        };
        let unit = &mut self.units[index];
        let resolved =
            transfer::resolve(&unit.info.lock().expect("info lock"), &unit.alts, &transfer);
        let resolved = match resolved {
            Ok(resolved) => resolved,
            Err(e) => return unit.deliver(endpoint, reply, Err(e)),
        };
        if resolved.address == 0 {
            let setup = transfer.setup.expect("resolve checked the setup packet");
            match unit.control(&setup, &transfer.data) {
                Ok((completion, effect)) => {
                    let result = transfer::answer(&transfer, completion);
                    unit.deliver(0, reply, result);
                    if let Some(effect) = effect {
                        self.apply(index, effect);
                    }
                }
                Err(e) => unit.deliver(0, reply, Err(e)),
            }
            return;
        }
        let deadline = transfer
            .timeout_ms
            .map(|ms| Instant::now() + Duration::from_millis(u64::from(ms)));
        unit.queues
            .entry(resolved.address)
            .or_default()
            .push_back(Pending {
                transfer,
                reply,
                deadline,
            });
        // Complete at once what the device can complete now (an OUT may also
        // satisfy an IN waiting on the loopback).
        unit.pump(Instant::now());
    }

    fn apply(&mut self, index: usize, effect: Effect) {
        match effect {
            Effect::Stall(endpoint) => {
                self.units[index].halted.insert(endpoint);
            }
            Effect::StallAfter { endpoint, bytes } => {
                self.units[index].stall_after.insert(endpoint, bytes);
            }
            Effect::Delay(ms) => self.units[index].delay = Duration::from_millis(ms),
            Effect::Freeze(seconds) => {
                // Let the reply to the request go out first.
                self.freeze = Some((
                    Instant::now() + Duration::from_millis(50),
                    Duration::from_secs(seconds),
                ));
            }
            Effect::Unplug(ms) => {
                let unit = &mut self.units[index];
                unit.plugged = false;
                unit.opened_by = None;
                unit.replug_at = Some(Instant::now() + Duration::from_millis(ms));
                unit.fail_pending(UsbError::NoDevice, None);
                let gone = unit.info();
                tracing::info!(device = %gone.key, "simulated unplug");
                self.publish();
                let _ = self.events.send(BackendEvent::Left(gone));
            }
        }
    }

    /// Plugs a unit in again as a new device; its listing, to announce once
    /// published.
    fn replug(&mut self, index: usize) -> DeviceInfo {
        let address = self.take_address();
        let base_delay = self.base_delay;
        let unit = &mut self.units[index];
        let info = unit.behaviour.fresh_info(address);
        // A new plug-in is a new device: fresh state, new address, same key.
        unit.info = Arc::new(Mutex::new(info.clone()));
        unit.plugged = true;
        unit.replug_at = None;
        unit.forget_endpoint_state();
        unit.behaviour.reset();
        unit.delay = base_delay;
        tracing::info!(device = %info.key, address, "simulated replug");
        info
    }

    fn set_configuration(&mut self, open: u64, value: u8) -> Result<(), UsbError> {
        let unit = self.unit_for(open).ok_or(UsbError::NoDevice)?;
        let mut info = unit.info.lock().expect("info lock");
        if value != 0 && !info.configurations.iter().any(|c| c.value == value) {
            return Err(UsbError::Stall);
        }
        info.active_configuration = value;
        drop(info);
        unit.fail_pending(UsbError::Cancelled, None);
        unit.forget_endpoint_state();
        unit.behaviour.reset();
        self.publish();
        Ok(())
    }
}

fn set_interface(unit: &mut Unit, interface: u8, alt: u8) -> Result<(), UsbError> {
    let info = unit.info();
    let config = info.active_config().ok_or(UsbError::Stall)?;
    let current = config
        .alt_setting(interface, unit.alts.get(&interface).copied().unwrap_or(0))
        .ok_or(UsbError::Stall)?;
    config.alt_setting(interface, alt).ok_or(UsbError::Stall)?;
    let endpoints: Vec<u8> = current.endpoints.iter().map(|e| e.address).collect();
    unit.fail_pending(UsbError::Cancelled, Some(&endpoints));
    for ep in &endpoints {
        unit.halted.remove(ep);
        unit.stall_after.remove(ep);
    }
    unit.alts.insert(interface, alt);
    Ok(())
}

/// `transfer` asking for (or carrying) no more than `limit` bytes.
fn limited_to(transfer: &Transfer, limit: u32) -> Transfer {
    let data = match &transfer.data {
        TransferData::In { .. } => TransferData::In { length: limit },
        TransferData::Out(bytes) => TransferData::Out(bytes.slice(..limit as usize)),
    };
    Transfer {
        data,
        ..transfer.clone()
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
