//! Simulated USB devices for tests, the demo and benchmarks, behaving like
//! real ones: descriptors answered on endpoint 0, per-endpoint FIFO queues,
//! NAK (pending) until data is there, stalls until cleared, unplug and replug
//! with new bus addresses, and completion delays.
//!
//! Like a real USB stack the simulation runs on its own thread, so a hung
//! "USB thread" (see [`zero::control::FREEZE`]) is something the helper's
//! watchdog must notice.

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
    Completion, DeviceInfo, DeviceKey, RequestId, SetupPacket, Transfer, TransferData, UsbError,
    std_request,
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use crate::backend::{BackendEvent, HEALTH_TIMEOUT};
use crate::transfer::{self, ReplySink};

/// Side effects a vendor request asks of the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Halt this endpoint address.
    Stall(u8),
    /// Unplug, replug after this many milliseconds.
    Unplug(u64),
    /// Delay every completion by this many milliseconds.
    Delay(u64),
    /// Block the USB thread for this many seconds.
    Freeze(u64),
}

/// The simulated bus, driven from its own thread.
pub struct SimBackend {
    commands: mpsc::UnboundedSender<Command>,
    snapshot: Arc<Mutex<Vec<DeviceInfo>>>,
    events: broadcast::Sender<BackendEvent>,
}

/// An open simulated device.
pub struct SimDevice {
    commands: mpsc::UnboundedSender<Command>,
    open: u64,
    info: Arc<Mutex<DeviceInfo>>,
}

type Ack = oneshot::Sender<Result<(), UsbError>>;

enum Command {
    Open {
        key: DeviceKey,
        reply: oneshot::Sender<Result<SimDevice, UsbError>>,
    },
    Submit {
        open: u64,
        transfer: Transfer,
        reply: ReplySink,
    },
    Cancel {
        open: u64,
        id: RequestId,
    },
    SetConfiguration {
        open: u64,
        value: u8,
        reply: Ack,
    },
    SetInterface {
        open: u64,
        interface: u8,
        alt: u8,
        reply: Ack,
    },
    ClearHalt {
        open: u64,
        endpoint: u8,
        reply: Ack,
    },
    Reset {
        open: u64,
        reply: Ack,
    },
    Close {
        open: u64,
        reply: oneshot::Sender<()>,
    },
    Ping {
        reply: oneshot::Sender<()>,
    },
}

impl SimBackend {
    /// Plugs in the configured devices and starts the simulation thread.
    pub fn start(config: &SimSection) -> SimBackend {
        let (commands, receiver) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(64);
        let snapshot = Arc::new(Mutex::new(Vec::new()));
        let mut bus = Bus {
            units: Vec::new(),
            snapshot: snapshot.clone(),
            events: events.clone(),
            next_open: 1,
            next_address: 2,
            freeze: None,
            commands: commands.clone(),
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
        std::thread::Builder::new()
            .name("sim-usb".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .expect("sim runtime");
                runtime.block_on(bus.run(receiver));
            })
            .expect("spawn sim thread");
        SimBackend {
            commands,
            snapshot,
            events,
        }
    }

    /// Devices currently plugged in.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.snapshot.lock().expect("snapshot lock").clone()
    }

    /// Hotplug events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<BackendEvent> {
        self.events.subscribe()
    }

    /// Opens a device for exclusive use.
    pub async fn open(&self, key: &DeviceKey) -> Result<SimDevice, UsbError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Open {
            key: key.clone(),
            reply,
        });
        answer.await.unwrap_or_else(|_| Err(thread_gone()))
    }

    /// True if the simulation thread answers within [`HEALTH_TIMEOUT`].
    pub async fn healthy(&self) -> bool {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Ping { reply });
        matches!(
            tokio::time::timeout(HEALTH_TIMEOUT, answer).await,
            Ok(Ok(()))
        )
    }

    fn send(&self, command: Command) {
        let _ = self.commands.send(command);
    }
}

fn thread_gone() -> UsbError {
    UsbError::Io("simulation thread is gone".into())
}

impl SimDevice {
    /// The device's current listing.
    pub fn info(&self) -> DeviceInfo {
        self.info.lock().expect("info lock").clone()
    }

    /// Queues a transfer.
    pub fn submit(&self, transfer: Transfer, reply: ReplySink) {
        let _ = self.commands.send(Command::Submit {
            open: self.open,
            transfer,
            reply,
        });
    }

    /// Cancels a pending transfer.
    pub fn cancel(&self, id: RequestId) {
        let _ = self.commands.send(Command::Cancel {
            open: self.open,
            id,
        });
    }

    async fn ask(&self, make: impl FnOnce(Ack) -> Command) -> Result<(), UsbError> {
        let (reply, answer) = oneshot::channel();
        let _ = self.commands.send(make(reply));
        answer.await.unwrap_or_else(|_| Err(thread_gone()))
    }

    /// SET_CONFIGURATION.
    pub async fn set_configuration(&self, value: u8) -> Result<(), UsbError> {
        let open = self.open;
        self.ask(|reply| Command::SetConfiguration { open, value, reply })
            .await
    }

    /// SET_INTERFACE.
    pub async fn set_interface(&self, interface: u8, alt: u8) -> Result<(), UsbError> {
        let open = self.open;
        self.ask(|reply| Command::SetInterface {
            open,
            interface,
            alt,
            reply,
        })
        .await
    }

    /// CLEAR_FEATURE(ENDPOINT_HALT).
    pub async fn clear_halt(&self, endpoint: u8) -> Result<(), UsbError> {
        let open = self.open;
        self.ask(|reply| Command::ClearHalt {
            open,
            endpoint,
            reply,
        })
        .await
    }

    /// Port reset.
    pub async fn reset(&self) -> Result<(), UsbError> {
        let open = self.open;
        self.ask(|reply| Command::Reset { open, reply }).await
    }

    /// Releases the device; pending transfers end with `Cancelled`.
    pub async fn close(&self) {
        let (reply, answer) = oneshot::channel();
        let _ = self.commands.send(Command::Close {
            open: self.open,
            reply,
        });
        let _ = answer.await;
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
    result: Result<Completion, UsbError>,
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

    fn deliver(&mut self, endpoint: u8, reply: ReplySink, result: Result<Completion, UsbError>) {
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
                    delivery.reply.send(delivery.result).await;
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
                Err(back) => back,
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
                let result = if self.halted.contains(&ep) {
                    Poll::Ready(Err(UsbError::Stall))
                } else {
                    match &mut self.behaviour {
                        Behaviour::Zero(z) => z.data(config, &head.transfer),
                        Behaviour::Keyboard(k) => k.data(&head.transfer, now),
                    }
                };
                let Poll::Ready(result) = result else { break };
                let pending = queue.pop_front().expect("head exists");
                let result = result.and_then(|c| transfer::check_short(&pending.transfer, c));
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
    commands: mpsc::UnboundedSender<Command>,
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

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        loop {
            let wake = self
                .units
                .iter()
                .filter_map(Unit::next_wakeup)
                .chain(self.freeze.map(|(at, _)| at))
                .min();
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.handle(command),
                    None => return,
                },
                _ = sleep_until(wake) => {}
            }
            self.tick(Instant::now());
        }
    }

    fn tick(&mut self, now: Instant) {
        if let Some((at, duration)) = self.freeze
            && at <= now
        {
            self.freeze = None;
            tracing::warn!("simulated USB thread hangs for {duration:?}");
            std::thread::sleep(duration);
        }
        let mut changed = false;
        for i in 0..self.units.len() {
            if self.units[i].replug_at.is_some_and(|at| at <= now) {
                self.replug(i);
                changed = true;
            }
            self.units[i].pump(now);
        }
        if changed {
            self.publish();
        }
    }

    fn unit_for(&mut self, open: u64) -> Option<&mut Unit> {
        self.units
            .iter_mut()
            .find(|u| u.plugged && u.opened_by == Some(open))
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Ping { reply } => {
                let _ = reply.send(());
            }
            Command::Open { key, reply } => {
                let _ = reply.send(self.open(&key));
            }
            Command::Submit {
                open,
                transfer,
                reply,
            } => self.submit(open, transfer, reply),
            Command::Cancel { open, id } => {
                if let Some(unit) = self.unit_for(open) {
                    let found = unit.queues.iter_mut().find_map(|(ep, queue)| {
                        let at = queue.iter().position(|p| p.reply.id == id)?;
                        Some((*ep, queue.remove(at)?))
                    });
                    if let Some((ep, pending)) = found {
                        unit.deliver(ep, pending.reply, Err(UsbError::Cancelled));
                    }
                }
            }
            Command::SetConfiguration { open, value, reply } => {
                let result = self.set_configuration(open, value);
                let _ = reply.send(result);
            }
            Command::SetInterface {
                open,
                interface,
                alt,
                reply,
            } => {
                let result = match self.unit_for(open) {
                    None => Err(UsbError::NoDevice),
                    Some(unit) => set_interface(unit, interface, alt),
                };
                let _ = reply.send(result);
            }
            Command::ClearHalt {
                open,
                endpoint,
                reply,
            } => {
                let result = match self.unit_for(open) {
                    None => Err(UsbError::NoDevice),
                    Some(unit) => {
                        unit.halted.remove(&endpoint);
                        Ok(())
                    }
                };
                let _ = reply.send(result);
            }
            Command::Reset { open, reply } => {
                let result = match self.unit_for(open) {
                    None => Err(UsbError::NoDevice),
                    Some(unit) => {
                        unit.fail_pending(UsbError::Cancelled, None);
                        unit.halted.clear();
                        unit.alts.clear();
                        unit.behaviour.reset();
                        Ok(())
                    }
                };
                let _ = reply.send(result);
            }
            Command::Close { open, reply } => {
                if let Some(unit) = self.unit_for(open) {
                    unit.fail_pending(UsbError::Cancelled, None);
                    unit.opened_by = None;
                    unit.alts.clear();
                    unit.halted.clear();
                }
                let _ = reply.send(());
            }
        }
    }

    fn open(&mut self, key: &DeviceKey) -> Result<SimDevice, UsbError> {
        let open = self.next_open;
        let commands = self.commands.clone();
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
        Ok(SimDevice {
            commands,
            open,
            info: unit.info.clone(),
        })
    }

    fn submit(&mut self, open: u64, transfer: Transfer, reply: ReplySink) {
        let endpoint = transfer.endpoint;
        let Some(index) = self
            .units
            .iter()
            .position(|u| u.plugged && u.opened_by == Some(open))
        else {
            tokio::spawn(reply.send(Err(UsbError::NoDevice)));
            return;
        };
        let unit = &mut self.units[index];
        let info = unit.info();
        let resolved = match transfer::resolve(&info, &unit.alts, &transfer) {
            Ok(resolved) => resolved,
            Err(e) => return unit.deliver(endpoint, reply, Err(e)),
        };
        if resolved.address == 0 {
            let setup = transfer.setup.expect("resolve checked the setup packet");
            match unit.control(&setup, &transfer.data) {
                Ok((completion, effect)) => {
                    let result = transfer::check_short(&transfer, completion);
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
    }

    fn apply(&mut self, index: usize, effect: Effect) {
        match effect {
            Effect::Stall(endpoint) => {
                self.units[index].halted.insert(endpoint);
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
                let key = unit.info().key;
                tracing::info!(device = %key, "simulated unplug");
                let _ = self.events.send(BackendEvent::Left(key));
                self.publish();
            }
        }
    }

    fn replug(&mut self, index: usize) {
        let address = self.take_address();
        let base_delay = self.base_delay;
        let unit = &mut self.units[index];
        let info = unit.behaviour.fresh_info(address);
        // A new plug-in is a new device: fresh state, new address, same key.
        unit.info = Arc::new(Mutex::new(info.clone()));
        unit.plugged = true;
        unit.replug_at = None;
        unit.alts.clear();
        unit.halted.clear();
        unit.behaviour.reset();
        unit.delay = base_delay;
        tracing::info!(device = %info.key, address, "simulated replug");
        let _ = self.events.send(BackendEvent::Arrived(info));
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
        unit.alts.clear();
        unit.halted.clear();
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
    }
    unit.alts.insert(interface, alt);
    Ok(())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
