//! The task that owns the swarm: it turns [`Command`]s into swarm calls,
//! swarm events into [`Event`]s and replies, validates gossip, and serves
//! blobs (reading them on blocking threads so the swarm never waits on disk).

use super::codec::{BlobCodec, CoordinatorCodec};
use super::shaper::Shaped;
use super::{
    BlobSource, Command, Event, MAX_CONCURRENT_STREAMS, MAX_CONNECTIONS_PER_PEER,
    MAX_ESTABLISHED_CONNECTIONS, MAX_PENDING_CONNECTIONS, NetworkConfig, NetworkError,
    NetworkStatus, REQUEST_TIMEOUT, Reachability, Topic, serve_blob,
};
use crate::limiter::RateLimiter;
use barnraise_protocol::limits::{BLOB_PROTOCOL, COORDINATOR_PROTOCOL};
use barnraise_protocol::messages::{
    BlobRequest, BlobResponse, CoordinatorRequest, CoordinatorResponse, Manifest, RoundPlan,
    UpdateNotice,
};
use barnraise_protocol::{PublicKey, Signed};
use futures::StreamExt;
use libp2p::core::{ConnectedPoint, Transport as _, upgrade};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{
    self, InboundRequestId, OutboundRequestId, ProtocolSupport, ResponseChannel,
};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, autonat, connection_limits, dcutr, gossipsub,
    identify, kad, noise, ping, relay, tcp, yamux,
};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The identify protocol name of barnraise meshes.
use barnraise_mesh::IDENTIFY_PROTOCOL;
/// Application-score penalty per offence (serving wrong bytes, lying about
/// a size). With weight 1, two offences cross gossipsub's graylist threshold.
const PENALTY_PER_OFFENCE: f64 = -50.0;
/// The coordinator's application score (weight 1): far above what gossip's
/// own penalties can take away.
const COORDINATOR_SCORE: f64 = 1000.0;

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    gossipsub: gossipsub::Behaviour,
    coordinator: request_response::Behaviour<CoordinatorCodec>,
    blob: request_response::Behaviour<BlobCodec>,
    autonat: autonat::Behaviour,
    relay: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
}

/// A blob response ready to send: to whom, on what, and, for a chunk of a
/// background blob, the request and the gate's permit it holds.
type Served = (
    PeerId,
    ResponseChannel<BlobResponse>,
    BlobResponse,
    Option<(InboundRequestId, tokio::sync::OwnedSemaphorePermit)>,
);

/// Owns the swarm; run it with [`EventLoop::run`].
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    blobs: Arc<dyn BlobSource>,
    upload: RateLimiter,
    coordinator_key: Option<PublicKey>,
    topics: HashMap<gossipsub::TopicHash, Topic>,
    relays: Vec<Multiaddr>,
    /// Relays we also dialled over QUIC (see `dial_relay_over_quic`).
    quic_dialled: HashSet<PeerId>,
    hole_punches: u64,
    hole_punches_failed: u64,
    /// Relay reservations accepted over the run (a relay will forward
    /// to us), however long each lasted.
    relay_reservations: u64,
    relay_listening: bool,
    penalties: HashMap<PeerId, f64>,
    served_tx: mpsc::Sender<Served>,
    served_rx: mpsc::Receiver<Served>,
    /// One chunk of a background blob on the uplink at a time
    /// (`BlobSource::background`): its permit is held from the read until
    /// the response is written out.
    background_gate: Arc<tokio::sync::Semaphore>,
    background_sending: HashMap<InboundRequestId, tokio::sync::OwnedSemaphorePermit>,
    pending_dial: HashMap<ConnectionId, (Multiaddr, oneshot::Sender<Result<PeerId, NetworkError>>)>,
    pending_coordinator:
        HashMap<OutboundRequestId, oneshot::Sender<Result<CoordinatorResponse, NetworkError>>>,
    pending_blob: HashMap<OutboundRequestId, oneshot::Sender<Result<BlobResponse, NetworkError>>>,
    pending_providers: HashMap<kad::QueryId, (HashSet<PeerId>, oneshot::Sender<Vec<PeerId>>)>,
}

fn gossip_config() -> Result<gossipsub::Config, NetworkError> {
    barnraise_mesh::gossip::config().map_err(NetworkError::Build)
}

/// Score parameters of our topics: invalid messages cost a lot (one
/// invalid message graylists the sender), and the delivery-rate penalties
/// are off because the coordinator publishes only a couple of messages per
/// round, far below any sensible delivery threshold.
fn topic_score_params() -> gossipsub::TopicScoreParams {
    gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -100.0,
        invalid_message_deliveries_decay: 0.5,
        ..Default::default()
    }
}

impl EventLoop {
    pub(crate) fn new(
        config: NetworkConfig,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
    ) -> Result<EventLoop, NetworkError> {
        let build = |e: &dyn std::fmt::Display| NetworkError::Build(e.to_string());
        let coordinator_support = if config.serve_coordinator {
            ProtocolSupport::Full
        } else {
            ProtocolSupport::Outbound
        };
        let gossip = gossip_config()?;
        let swarm = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone())
            .with_tokio()
            .with_quic()
            // TCP as `with_tcp` builds it, with every connection's bytes
            // through the link shaper (a pass-through without a link).
            .with_other_transport(|key| {
                let link = config.link.clone();
                let noise = noise::Config::new(key)
                    .map_err(Box::<dyn std::error::Error + Send + Sync>::from)?;
                Ok(
                    tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                        .map(move |stream, _| Shaped::new(stream, link.clone()))
                        .upgrade(upgrade::Version::V1Lazy)
                        .authenticate(noise)
                        .multiplex(yamux::Config::default()),
                )
            })
            .map_err(|e| build(&e))?
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| build(&e))?
            .with_behaviour(|key, relay| {
                let peer_id = key.public().to_peer_id();
                let kad = barnraise_mesh::dht::behaviour(peer_id);
                let mut gossipsub = gossipsub::Behaviour::new(
                    gossipsub::MessageAuthenticity::Signed(key.clone()),
                    gossip,
                )
                .map_err(|e| Box::<dyn std::error::Error + Send + Sync>::from(e.to_string()))?;
                let score = gossipsub::PeerScoreParams {
                    app_specific_weight: 1.0,
                    ..Default::default()
                };
                gossipsub
                    .with_peer_score(score, gossipsub::PeerScoreThresholds::default())
                    .map_err(Box::<dyn std::error::Error + Send + Sync>::from)?;
                let request_config = request_response::Config::default()
                    .with_request_timeout(REQUEST_TIMEOUT)
                    .with_max_concurrent_streams(MAX_CONCURRENT_STREAMS);
                let limits = connection_limits::ConnectionLimits::default()
                    .with_max_established(Some(MAX_ESTABLISHED_CONNECTIONS))
                    .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
                    .with_max_pending_incoming(Some(MAX_PENDING_CONNECTIONS))
                    .with_max_pending_outgoing(Some(MAX_PENDING_CONNECTIONS));
                let autonat_config = autonat::Config {
                    boot_delay: Duration::from_secs(2),
                    retry_interval: Duration::from_secs(30),
                    refresh_interval: Duration::from_secs(300),
                    // A status from one failed dial-back is enough to try the
                    // relay; later probes raise or lower it.
                    confidence_max: 1,
                    throttle_server_period: Duration::from_secs(10),
                    // LAN peers count as servers: on a private network
                    // reachable means reachable by the run.
                    only_global_ips: false,
                    ..Default::default()
                };
                Ok(Behaviour {
                    limits: connection_limits::Behaviour::new(limits),
                    // Pushing new listen addresses tells peers (the coordinator's
                    // DHT first) about a relayed address as soon as it is up.
                    identify: identify::Behaviour::new(
                        identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
                            .with_push_listen_addr_updates(true),
                    ),
                    ping: ping::Behaviour::new(ping::Config::new()),
                    kad,
                    gossipsub,
                    coordinator: request_response::Behaviour::with_codec(
                        CoordinatorCodec::default(),
                        [(
                            StreamProtocol::new(COORDINATOR_PROTOCOL),
                            coordinator_support,
                        )],
                        request_config.clone(),
                    ),
                    blob: request_response::Behaviour::with_codec(
                        BlobCodec::default(),
                        [(StreamProtocol::new(BLOB_PROTOCOL), ProtocolSupport::Full)],
                        request_config,
                    ),
                    autonat: autonat::Behaviour::new(peer_id, autonat_config),
                    relay,
                    dcutr: dcutr::Behaviour::new(peer_id),
                })
            })
            .map_err(|e| build(&e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
            .build();
        let mut swarm = swarm;
        for addr in &config.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| NetworkError::Listen {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
        }
        let (served_tx, served_rx) = mpsc::channel(64);
        Ok(EventLoop {
            swarm,
            commands,
            events,
            blobs: config.blobs,
            upload: config.upload,
            coordinator_key: config.coordinator_key,
            topics: HashMap::new(),
            relays: Vec::new(),
            quic_dialled: HashSet::new(),
            hole_punches: 0,
            hole_punches_failed: 0,
            relay_reservations: 0,
            relay_listening: false,
            penalties: HashMap::new(),
            served_tx,
            served_rx,
            background_gate: Arc::new(tokio::sync::Semaphore::new(1)),
            background_sending: HashMap::new(),
            pending_dial: HashMap::new(),
            pending_coordinator: HashMap::new(),
            pending_blob: HashMap::new(),
            pending_providers: HashMap::new(),
        })
    }

    /// Waits until the swarm has at least one listen address (so callers
    /// can announce it), or `timeout` passes.
    pub async fn wait_for_listen_addrs(&mut self, timeout: Duration) -> Vec<Multiaddr> {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.swarm.listeners().next().is_none() {
            match tokio::time::timeout_at(deadline, self.swarm.select_next_some()).await {
                Ok(event) => self.handle_swarm_event(event),
                Err(_) => break,
            }
        }
        // The other listeners (QUIC, further interfaces) report right after
        // the first; give them a moment so callers see the whole set.
        let settle = tokio::time::Instant::now() + Duration::from_millis(100);
        while let Ok(event) =
            tokio::time::timeout_at(settle.min(deadline), self.swarm.select_next_some()).await
        {
            self.handle_swarm_event(event);
        }
        self.swarm.listeners().cloned().collect()
    }

    /// Runs until `shutdown` fires or every [`super::Client`] is dropped.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                command = self.commands.recv() => match command {
                    Some(command) => self.handle_command(command),
                    None => break,
                },
                Some((peer, channel, response, gate)) = self.served_rx.recv() => {
                    let bytes = match &response { BlobResponse::Chunk { data } => data.len() as u64, _ => 0 };
                    if self.swarm.behaviour_mut().blob.send_response(channel, response).is_ok() {
                        if let Some((request_id, permit)) = gate {
                            // Held until the chunk is written out (or fails).
                            self.background_sending.insert(request_id, permit);
                        }
                        if bytes > 0 {
                            self.emit(Event::BlobServed { peer, bytes });
                        }
                    }
                }
                event = self.swarm.select_next_some() => self.handle_swarm_event(event),
            }
        }
        // Fail whoever still waits, so no caller hangs on a stopped network.
        for (_, (_, reply)) in self.pending_dial.drain() {
            let _ = reply.send(Err(NetworkError::Closed));
        }
    }

    fn emit(&self, event: Event) {
        if let Err(mpsc::error::TrySendError::Full(event)) = self.events.try_send(event) {
            tracing::warn!("node is not keeping up with network events; dropped {event:?}");
        }
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::Dial { addr, reply } => {
                let opts = DialOpts::unknown_peer_id().address(addr.clone()).build();
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.pending_dial.insert(id, (addr, reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NetworkError::Dial {
                            addr,
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Command::AddAddress { peer, addr } => {
                self.swarm.add_peer_address(peer, addr.clone());
                self.swarm.behaviour_mut().kad.add_address(&peer, addr);
            }
            Command::Coordinator {
                peer,
                request,
                reply,
            } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .coordinator
                    .send_request(&peer, request);
                self.pending_coordinator.insert(id, reply);
            }
            Command::Blob {
                peer,
                request,
                reply,
            } => {
                let id = self.swarm.behaviour_mut().blob.send_request(&peer, request);
                self.pending_blob.insert(id, reply);
            }
            Command::RespondCoordinator { channel, response } => {
                if self
                    .swarm
                    .behaviour_mut()
                    .coordinator
                    .send_response(channel, response)
                    .is_err()
                {
                    tracing::debug!("coordinator-protocol peer went away before our answer");
                }
            }
            Command::Subscribe { topic, reply } => {
                let ident = gossipsub::IdentTopic::new(topic.name());
                let gossip = &mut self.swarm.behaviour_mut().gossipsub;
                let result =
                    gossip
                        .subscribe(&ident)
                        .map(|_| ())
                        .map_err(|e| NetworkError::Publish {
                            topic: topic.name(),
                            reason: e.to_string(),
                        });
                if let Err(e) = gossip.set_topic_params(ident.clone(), topic_score_params()) {
                    tracing::warn!("gossip scoring for {}: {e}", topic.name());
                }
                self.topics.insert(ident.hash(), topic);
                let _ = reply.send(result);
            }
            Command::Publish { topic, data, reply } => {
                let ident = gossipsub::IdentTopic::new(topic.name());
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(ident, data)
                    .map(|_| ())
                    .map_err(|e| NetworkError::Publish {
                        topic: topic.name(),
                        reason: e.to_string(),
                    });
                let _ = reply.send(result);
            }
            Command::SetCoordinatorKey { key } => {
                self.coordinator_key = Some(key);
                self.favour_coordinator();
            }
            Command::AddRelay { addr } => {
                if !self.relays.contains(&addr) {
                    self.relays.push(addr.clone());
                }
                // The relay (the coordinator) is also our AutoNAT server.
                let peer = addr.iter().find_map(|p| match p {
                    Protocol::P2p(peer) => Some(peer),
                    _ => None,
                });
                if let Some(peer) = peer {
                    let dial: Multiaddr = addr
                        .iter()
                        .filter(|p| !matches!(p, Protocol::P2p(_)))
                        .collect();
                    self.swarm
                        .behaviour_mut()
                        .autonat
                        .add_server(peer, Some(dial));
                }
                if matches!(
                    self.swarm.behaviour().autonat.nat_status(),
                    autonat::NatStatus::Private
                ) {
                    self.listen_via_relay();
                }
            }
            Command::StartProviding { hash } => {
                if let Err(e) = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .start_providing(barnraise_mesh::dht::key(&hash))
                {
                    tracing::debug!("announcing blob {hash}: {e}");
                }
            }
            Command::StopProviding { hash } => {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .stop_providing(&barnraise_mesh::dht::key(&hash));
            }
            Command::GetProviders { hash, reply } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(barnraise_mesh::dht::key(&hash));
                self.pending_providers.insert(id, (HashSet::new(), reply));
            }
            Command::Penalize { peer, reason } => {
                if Some(peer) == self.coordinator_peer() {
                    // Its blobs are checked like anyone's, but gossip must
                    // never graylist the one peer that signs plans.
                    tracing::warn!(%peer, "the coordinator {reason}; not lowering its gossip score");
                    return;
                }
                let score = self.penalties.entry(peer).or_insert(0.0);
                *score += PENALTY_PER_OFFENCE;
                let score = *score;
                tracing::warn!(%peer, score, "penalizing peer: {reason}");
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .set_application_score(&peer, score);
            }
            Command::PeerScore { peer, reply } => {
                let _ = reply.send(self.swarm.behaviour().gossipsub.peer_score(&peer));
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
        }
    }

    fn coordinator_peer(&self) -> Option<PeerId> {
        self.coordinator_key.and_then(|k| k.to_peer_id().ok())
    }

    /// Gives the coordinator an application score that outweighs any
    /// penalty gossipsub could add (IP colocation of many nodes behind one
    /// address, broken promises on a slow link), so it is never graylisted.
    fn favour_coordinator(&mut self) {
        if let Some(peer) = self.coordinator_peer() {
            self.swarm
                .behaviour_mut()
                .gossipsub
                .set_application_score(&peer, COORDINATOR_SCORE);
        }
    }

    fn status(&self) -> NetworkStatus {
        let listen_addrs: Vec<Multiaddr> = self.swarm.listeners().cloned().collect();
        let relayed = listen_addrs
            .iter()
            .find(|a| a.iter().any(|p| matches!(p, Protocol::P2pCircuit)))
            .cloned();
        let reachability = match (self.swarm.behaviour().autonat.nat_status(), relayed) {
            (autonat::NatStatus::Public(addr), _) => Reachability::Public(addr),
            (_, Some(addr)) => Reachability::Relayed(addr),
            (autonat::NatStatus::Private, None) => Reachability::Private,
            (autonat::NatStatus::Unknown, None) => Reachability::Unknown,
        };
        NetworkStatus {
            peer_id: *self.swarm.local_peer_id(),
            listen_addrs,
            external_addrs: self.swarm.external_addresses().cloned().collect(),
            reachability,
            connected_peers: self.swarm.connected_peers().copied().collect(),
            hole_punches: self.hole_punches,
            hole_punches_failed: self.hole_punches_failed,
            relay_reservations: self.relay_reservations,
        }
    }

    /// Hole punching works over QUIC: its one UDP socket both listens and
    /// dials, so the NAT mapping the relay (the coordinator) observes is the
    /// one a peer can punch through to. TCP dials come from fresh ports and
    /// rarely punch through. So once we know a relay's QUIC addresses, we
    /// also connect to it over QUIC; identify then reports our QUIC mapping
    /// as an address candidate for DCUtR.
    fn dial_relay_over_quic(&mut self, peer: PeerId, addrs: &[Multiaddr]) {
        let is_relay = self.relays.iter().any(|relay| {
            relay
                .iter()
                .any(|p| matches!(p, Protocol::P2p(id) if id == peer))
        });
        if !is_relay || self.quic_dialled.contains(&peer) {
            return;
        }
        let quic: Vec<Multiaddr> = addrs
            .iter()
            .filter(|a| a.iter().any(|p| matches!(p, Protocol::QuicV1)))
            .take(8)
            .cloned()
            .collect();
        if quic.is_empty() {
            return;
        }
        self.quic_dialled.insert(peer);
        let opts = DialOpts::peer_id(peer)
            .addresses(quic)
            .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, "could not dial the relay over QUIC: {e}");
        }
    }

    fn listen_via_relay(&mut self) {
        if self.relay_listening {
            return;
        }
        for relay in self.relays.clone() {
            let circuit = relay.with(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(_) => {
                    tracing::info!("behind NAT: listening through relay {circuit}");
                    self.relay_listening = true;
                    return;
                }
                Err(e) => tracing::warn!("could not listen through relay {circuit}: {e}"),
            }
        }
    }

    fn handle_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(event) => self.handle_behaviour_event(event),
            SwarmEvent::NewListenAddr { address, .. } => tracing::info!("listening on {address}"),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                if let Some((_, reply)) = self.pending_dial.remove(&connection_id) {
                    let _ = reply.send(Ok(peer_id));
                }
                if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                    // Addresses we dialled successfully are good routing entries.
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, address.clone());
                }
                if num_established.get() == 1 {
                    if Some(peer_id) == self.coordinator_peer() {
                        self.favour_coordinator();
                    }
                    self.emit(Event::PeerConnected { peer: peer_id });
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.emit(Event::PeerDisconnected { peer: peer_id });
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                peer_id,
            } => {
                if let Some((addr, reply)) = self.pending_dial.remove(&connection_id) {
                    let _ = reply.send(Err(NetworkError::Dial {
                        addr,
                        reason: error.to_string(),
                    }));
                } else {
                    tracing::debug!(?peer_id, "outgoing connection failed: {error}");
                }
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                tracing::debug!(%send_back_addr, "incoming connection failed: {error}");
            }
            _ => {}
        }
    }

    fn handle_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                self.handle_gossip(propagation_source, message_id, message);
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::SlowPeer { peer_id, .. }) => {
                tracing::debug!(%peer_id, "gossip peer is slow");
            }
            BehaviourEvent::Coordinator(event) => self.handle_coordinator_event(event),
            BehaviourEvent::Blob(event) => self.handle_blob_event(event),
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                self.dial_relay_over_quic(peer_id, &info.listen_addrs);
                for addr in info.listen_addrs.into_iter().take(16) {
                    // Loopback and private addresses are fine here: tests and
                    // LAN clusters rely on them.
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(result),
                step,
                ..
            }) => {
                let finished = match result {
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                        let some = !providers.is_empty();
                        if let Some((found, _)) = self.pending_providers.get_mut(&id) {
                            found.extend(providers);
                        }
                        // The first providers are enough to start a download
                        // (it hedges and falls back to the coordinator): a
                        // peer that never answers (asleep, stopped) must not
                        // hold the lookup until its timeout.
                        if some
                            && !step.last
                            && let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&id)
                        {
                            query.finish();
                        }
                        step.last || some
                    }
                    Ok(kad::GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => true,
                    Err(e) => {
                        tracing::debug!("provider lookup failed: {e}");
                        true
                    }
                };
                if finished && let Some((found, reply)) = self.pending_providers.remove(&id) {
                    let _ = reply.send(found.into_iter().collect());
                }
            }
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { old, new }) => {
                tracing::info!("NAT status: {old:?} -> {new:?}");
                if matches!(new, autonat::NatStatus::Private) {
                    self.listen_via_relay();
                }
                let status = self.status().reachability;
                self.emit(Event::ReachabilityChanged(status));
            }
            BehaviourEvent::Relay(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                ..
            }) => {
                self.relay_reservations += 1;
                tracing::info!(%relay_peer_id, "relay reservation accepted");
            }
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => match result {
                Ok(_) => {
                    self.hole_punches += 1;
                    tracing::info!(peer = %remote_peer_id, "hole punched: direct connection");
                }
                Err(e) => {
                    self.hole_punches_failed += 1;
                    tracing::info!(peer = %remote_peer_id, "hole punching failed ({e}); staying relayed");
                }
            },
            _ => {}
        }
    }

    fn handle_gossip(
        &mut self,
        source: PeerId,
        id: gossipsub::MessageId,
        message: gossipsub::Message,
    ) {
        let topic = self.topics.get(&message.topic).cloned();
        let verdict = match (&topic, &self.coordinator_key) {
            (None, _) => Err("message on a topic we did not subscribe to".to_string()),
            // Without the coordinator's key we cannot judge; ignoring is not
            // the sender's fault, so it costs them nothing.
            (Some(_), None) => {
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(
                        &id,
                        &source,
                        gossipsub::MessageAcceptance::Ignore,
                    );
                return;
            }
            (Some(topic), Some(key)) => validate_gossip(topic, &message.data, key, source),
        };
        let gossip = &mut self.swarm.behaviour_mut().gossipsub;
        match verdict {
            Ok(event) => {
                gossip.report_message_validation_result(
                    &id,
                    &source,
                    gossipsub::MessageAcceptance::Accept,
                );
                self.emit(event);
            }
            Err(reason) => {
                let topic = topic
                    .map(|t| t.name())
                    .unwrap_or_else(|| message.topic.to_string());
                tracing::warn!(peer = %source, %topic, "rejected gossip: {reason}");
                gossip.report_message_validation_result(
                    &id,
                    &source,
                    gossipsub::MessageAcceptance::Reject,
                );
                self.emit(Event::GossipRejected {
                    source,
                    topic,
                    reason,
                });
            }
        }
    }

    fn handle_coordinator_event(
        &mut self,
        event: request_response::Event<CoordinatorRequest, CoordinatorResponse>,
    ) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.pending_coordinator.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    self.emit(Event::CoordinatorRequest {
                        peer,
                        request,
                        channel,
                    });
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                tracing::debug!(%peer, "coordinator request failed: {error}");
                if let Some(reply) = self.pending_coordinator.remove(&request_id) {
                    let _ = reply.send(Err(NetworkError::Request {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "inbound coordinator request failed: {error}");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn handle_blob_event(&mut self, event: request_response::Event<BlobRequest, BlobResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.pending_blob.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
                request_response::Message::Request {
                    request_id,
                    request,
                    channel,
                } => {
                    // Read on a blocking thread and wait for the upload cap
                    // off the loop; the answer comes back through `served_rx`.
                    // A background blob's chunk first waits for the one
                    // before it to be written out.
                    let source = Arc::clone(&self.blobs);
                    let upload = self.upload.clone();
                    let served = self.served_tx.clone();
                    let gate = match &request {
                        BlobRequest::Chunk { hash, .. } if source.background(hash) => {
                            Some(self.background_gate.clone())
                        }
                        _ => None,
                    };
                    tokio::spawn(async move {
                        let permit = match gate {
                            Some(gate) => match gate.acquire_owned().await {
                                Ok(permit) => Some((request_id, permit)),
                                Err(_) => return,
                            },
                            None => None,
                        };
                        let response = tokio::task::spawn_blocking(move || {
                            serve_blob(source.as_ref(), &request)
                        })
                        .await
                        .unwrap_or_else(|_| BlobResponse::Refused {
                            reason: "internal error".into(),
                        });
                        if let BlobResponse::Chunk { data } = &response {
                            upload.acquire(data.len() as u64).await;
                        }
                        let _ = served.send((peer, channel, response, permit)).await;
                    });
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                tracing::debug!(%peer, "blob request failed: {error}");
                if let Some(reply) = self.pending_blob.remove(&request_id) {
                    let _ = reply.send(Err(NetworkError::Request {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            request_response::Event::InboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                // Over-cap or malformed requests end up here: the codec
                // refused them before allocating.
                tracing::debug!(%peer, "inbound blob request failed: {error}");
                self.background_sending.remove(&request_id);
            }
            request_response::Event::ResponseSent { request_id, .. } => {
                self.background_sending.remove(&request_id);
            }
        }
    }
}

/// Checks a gossip message: it must be a signed plan or manifest (by topic),
/// signed by the coordinator, for the topic's run.
fn validate_gossip(
    topic: &Topic,
    data: &[u8],
    coordinator: &PublicKey,
    source: PeerId,
) -> Result<Event, String> {
    let run_id = topic.run_id();
    match topic {
        Topic::Plans { .. } => {
            let (signed, plan) =
                from_coordinator::<RoundPlan>(data, coordinator, run_id, "round plan", |p| {
                    &p.run_id
                })?;
            Ok(Event::Plan {
                source,
                plan,
                signed,
            })
        }
        Topic::Manifests { .. } => {
            let (signed, manifest) =
                from_coordinator::<Manifest>(data, coordinator, run_id, "manifest", |m| &m.run_id)?;
            Ok(Event::Manifest {
                source,
                manifest,
                signed,
            })
        }
        Topic::Updates { .. } => {
            let (_, notice) = from_coordinator::<UpdateNotice>(
                data,
                coordinator,
                run_id,
                "update notice",
                |n| &n.run_id,
            )?;
            Ok(Event::UpdateNotice { source, notice })
        }
    }
}

/// Decodes gossip as a `what` the coordinator signed for the topic's run
/// (any run when the topic's is empty).
fn from_coordinator<T: barnraise_protocol::signed::Message>(
    data: &[u8],
    coordinator: &PublicKey,
    run_id: &str,
    what: &str,
    run_of: impl Fn(&T) -> &String,
) -> Result<(Signed<T>, T), String> {
    let signed = Signed::<T>::from_bytes(data).map_err(|e| format!("not a signed {what}: {e}"))?;
    let message = signed
        .verify(Some(coordinator))
        .map_err(|e| format!("{what}: {e}"))?;
    let run = run_of(&message);
    if !run_id.is_empty() && run != run_id {
        return Err(format!(
            "{what} for run '{run}' on the topic of run '{run_id}'"
        ));
    }
    Ok((signed, message))
}
