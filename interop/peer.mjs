// A js-libp2p peer that talks to shardmesh nodes, driven by tests/test_interop.py.
//
// Run: node --import ./polyfill.mjs peer.mjs
// Control: one JSON command per line on stdin, {"id": 1, "cmd": "...", ...args}; one JSON
// reply per line on stdout, {"id": 1, "ok": true, ...result} or {"id": 1, "ok": false,
// "error": "..."}. The first line out is {"event": "ready", "peer": ..., "addrs": [...]}.
// Logs go to stderr. Commands run concurrently; every one has a deadline.
// With SHARDMESH_SWARM_KEY=<key file> in the environment the peer joins a private swarm:
// every connection starts with libp2p's pnet exchange under that key (@libp2p/pnet).

import { createInterface } from 'node:readline'
import { createLibp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { circuitRelayTransport } from '@libp2p/circuit-relay-v2'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { ping } from '@libp2p/ping'
import { kadDHT } from '@libp2p/kad-dht'
import { gossipsub } from '@libp2p/gossipsub'
import { generateKeyPair } from '@libp2p/crypto/keys'
import { peerIdFromString } from '@libp2p/peer-id'
import { multiaddr } from '@multiformats/multiaddr'
import { preSharedKey } from '@libp2p/pnet'
import { readFileSync } from 'node:fs'
import * as cbor from 'cborg'
import {
  NAMESPACE, RecordError, blockCid, recordKey, recordsTopic, selectDhtRecord, signRecord, validateDhtRecord, verifyRecord
} from './records.mjs'
import { FrameStream, StreamEnd, encodeFrame } from './wire.mjs'
import { Chain, INFER_PROTOCOL, signTicket } from './chain.mjs'

const SWARM_PROTOCOL = '/shardmesh/swarm/1.0.0'
const DEFAULT_TIMEOUT_MS = 20000

const privateKey = await generateKeyPair('Ed25519')
const swarmKeyFile = process.env.SHARDMESH_SWARM_KEY
const libp2p = await createLibp2p({
  privateKey,
  ...(swarmKeyFile ? { connectionProtector: preSharedKey({ psk: readFileSync(swarmKeyFile), timeout: 10000 }) } : {}),
  addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
  // circuitRelayTransport: dial nodes that are reachable only through a relay (/p2p-circuit).
  transports: [tcp(), circuitRelayTransport()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services: {
    identify: identify(),
    // One outbound ping stream per connection by default; a finished ping's stream
    // may not be counted closed yet when the next one opens (seen in CI): allow a few.
    ping: ping({ maxOutboundStreams: 4 }),
    dht: kadDHT({
      protocol: '/ipfs/kad/1.0.0',
      clientMode: false, // a server from the start: peers here are on loopback, never "public"
      peerInfoMapper: (info) => info, // the default drops 127.0.0.1 addresses
      validators: { [NAMESPACE]: validateDhtRecord },
      selectors: { [NAMESPACE]: selectDhtRecord }
    }),
    pubsub: gossipsub({ allowPublishToZeroTopicPeers: true, emitSelf: false })
  }
})
const me = libp2p.peerId.toString()
const log = (...args) => console.error(`[interop ${me.slice(-6)}]`, ...args)

// --- gossip: every message on a subscribed topic, checked here with our own verifier ----

const received = new Map() // topic -> [{from, record?, reason?}]
libp2p.services.pubsub.addEventListener('message', (evt) => {
  const msg = evt.detail
  const list = received.get(msg.topic)
  if (list === undefined) return
  const model = msg.topic.split('/').slice(1, -2).join('/')
  verifyRecord(msg.data, { expectedModel: model })
    .then((record) => {
      const from = msg.type === 'signed' ? msg.from.toString() : null
      // Section 4.1: the pubsub origin must be the record's own peer.
      if (from !== record.peer) throw new RecordError('wrong-peer', `record of ${record.peer} published by ${from}`)
      list.push({ from, record: plain(record) })
    })
    .catch((err) => list.push({ from: msg.from?.toString() ?? null, reason: err.reason ?? err.message }))
})

const announcing = new Map() // topic -> interval

const identified = new Map() // peer id -> the latest identify result
libp2p.addEventListener('peer:identify', (evt) => identified.set(evt.detail.peerId.toString(), evt.detail))

// --- helpers ------------------------------------------------------------------------------

/** CBOR values as JSON: bytes as hex, big integers as numbers. */
function plain (value) {
  if (value instanceof Uint8Array) return { hex: Buffer.from(value).toString('hex') }
  if (typeof value === 'bigint') return Number(value)
  if (Array.isArray(value)) return value.map(plain)
  if (value !== null && typeof value === 'object') return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, plain(v)]))
  return value
}

const fromHex = (hex) => Uint8Array.from(Buffer.from(hex, 'hex'))
const timeout = (args) => AbortSignal.timeout(args.timeout_ms ?? DEFAULT_TIMEOUT_MS)

function connectionInfo (conn) {
  return {
    peer: conn.remotePeer.toString(),
    direction: conn.direction,
    encryption: conn.encryption,
    multiplexer: conn.multiplexer,
    remote_addr: conn.remoteAddr.toString()
  }
}

async function until (what, check, timeoutMs) {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const value = await check()
    if (value) return value
    if (Date.now() > deadline) throw new Error(`not within ${timeoutMs} ms: ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}

async function openStream (peer, protocol, args) {
  return libp2p.dialProtocol(peerIdFromString(peer), protocol, { signal: timeout(args) })
}

function frameJson ({ header, payload }) {
  return { header: plain(header), payload_len: payload.length }
}

// --- commands -----------------------------------------------------------------------------

const chains = new Map() // session id -> Chain

const commands = {
  async dial (args) {
    return connectionInfo(await libp2p.dial(multiaddr(args.addr), { signal: timeout(args) }))
  },

  /** Wait for a connection with `peer` (e.g. one it dials to us) and describe it. */
  async connection (args) {
    const conn = await until(`a connection with ${args.peer}`,
      () => libp2p.getConnections(peerIdFromString(args.peer))[0], args.timeout_ms ?? DEFAULT_TIMEOUT_MS)
    return connectionInfo(conn)
  },

  /** What `peer` told us in identify: the result libp2p got when the connection opened
   * (running a second identify on the same connection would be refused: one outbound
   * identify stream per connection at a time). */
  async identify (args) {
    const result = await until(`identify from ${args.peer}`, () => identified.get(args.peer), args.timeout_ms ?? DEFAULT_TIMEOUT_MS)
    return {
      peer: result.peerId.toString(),
      protocols: result.protocols,
      listen_addrs: result.listenAddrs.map(String),
      agent: result.agentVersion ?? null,
      connection: connectionInfo(result.connection)
    }
  },

  async ping (args) {
    const rtts = []
    for (let i = 0; i < (args.count ?? 3); i++) {
      rtts.push(await libp2p.services.ping.ping(peerIdFromString(args.peer), { signal: timeout(args) }))
    }
    return { rtts }
  },

  /** /shardmesh/swarm/1.0.0 (section 5): the node's records, each verified here. */
  async swarm_map (args) {
    const fs = new FrameStream(await openStream(args.peer, SWARM_PROTOCOL, args), { maxPayload: 16 << 20 })
    const { header, payload } = await fs.readFrame(args.timeout_ms ?? DEFAULT_TIMEOUT_MS)
    await fs.closeWrite()
    if (header.t !== 'result' || typeof header.model !== 'string') throw new Error(`bad swarm map header ${JSON.stringify(plain(header))}`)
    const records = []
    const dropped = []
    for (const envelope of cbor.decode(payload)) {
      try {
        const record = await verifyRecord(envelope, { expectedModel: header.model })
        if (record.total_blocks !== header.total_blocks) throw new RecordError('bad-span', 'block count')
        records.push(plain(record))
      } catch (err) {
        dropped.push(err.reason ?? err.message)
      }
    }
    return { model: header.model, total_blocks: plain(header.total_blocks), records, dropped }
  },

  /** The keys of section 4 as this peer computes them. */
  async keys (args) {
    return {
      topic: recordsTopic(args.model),
      record_key: recordKey(args.model, args.peer),
      block_cids: (args.blocks ?? []).map((b) => blockCid(args.model, b).toString())
    }
  },

  async verify (args) {
    try {
      const record = await verifyRecord(fromHex(args.envelope_hex), { expectedPeer: args.expected_peer, expectedModel: args.expected_model })
      return { valid: true, record: plain(record) }
    } catch (err) {
      if (!(err instanceof RecordError)) throw err
      return { valid: false, reason: err.reason }
    }
  },

  async subscribe (args) {
    if (!received.has(args.topic)) received.set(args.topic, [])
    libp2p.services.pubsub.subscribe(args.topic)
    return {}
  },

  /** Gossip records received on `topic` so far (verified, or why not). */
  async received (args) {
    return { messages: received.get(args.topic) ?? [] }
  },

  /** Publish a record of our own (signed here) on the model's topic every second. The
   * record says `draining` with no throughput, so no node ever routes a session to us. */
  async announce (args) {
    const topic = recordsTopic(args.model)
    const publish = async () => {
      const now = Date.now() / 1000
      const envelope = await signRecord({
        peer: me,
        addrs: libp2p.getMultiaddrs().map(String),
        model: args.model,
        start: args.start,
        end: args.end,
        total_blocks: args.total_blocks,
        state: 'draining',
        throughput: 0,
        cache_tokens_free: 0,
        backend: 'none',
        device: 'none',
        dtype: 'none',
        rtt: {},
        version: 'js-interop',
        seq: Date.now(),
        expires: now + 30,
        api: null
      }, privateKey)
      await libp2p.services.pubsub.publish(topic, envelope).catch((err) => log('publish failed:', err.message))
    }
    clearInterval(announcing.get(topic))
    announcing.set(topic, setInterval(publish, 1000))
    await publish()
    return { topic }
  },

  async find_providers (args) {
    const cid = blockCid(args.model, args.block)
    const providers = new Set()
    for await (const event of libp2p.services.dht.findProviders(cid, { signal: timeout(args) })) {
      if (event.name === 'PROVIDER') event.providers.forEach((p) => providers.add(p.id.toString()))
      if (providers.has(args.expect)) break // found what the caller waits for: no need to walk on
    }
    return { cid: cid.toString(), providers: [...providers] }
  },

  /** A node's record from the DHT (our validator and selector run on what comes back),
   * verified again as the record of that peer and model. */
  async get_record (args) {
    const key = recordKey(args.model, args.peer)
    let value = null
    for await (const event of libp2p.services.dht.get(new TextEncoder().encode(key), { signal: timeout(args) })) {
      if (event.name === 'VALUE') value = event.value
    }
    if (value === null) throw new Error(`no value for ${key}`)
    const record = await verifyRecord(value, { expectedPeer: args.peer, expectedModel: args.model })
    return { key, record: plain(record) }
  },

  async chain_open (args) {
    const chain = new Chain(libp2p, {
      privateKey,
      session: args.session, model: args.model, route: args.route, prompt: args.prompt, maxLength: args.max_length
    })
    chains.set(args.session, chain)
    await chain.open(args.timeout_ms)
    return {}
  },

  async chain_step (args) {
    return chains.get(args.session).step(args.ids, args.position, args.timeout_ms)
  },

  async chain_close (args) {
    const chain = chains.get(args.session)
    chains.delete(args.session)
    return { ends: await chain.close() }
  },

  /** open, `n` greedy tokens, close: one whole session. */
  async generate (args) {
    const chain = new Chain(libp2p, {
      privateKey,
      session: args.session, model: args.model, route: args.route, prompt: args.prompt, maxLength: args.max_length
    })
    try {
      await chain.open(args.timeout_ms)
      return { tokens: await chain.generate(args.n, args.timeout_ms) }
    } finally {
      await chain.close()
    }
  },

  /** A scripted stream for abuse tests: `actions` run in order, each one of
   * {send_hex}, {send_frame, payload_hex?, sign_ticket?}, {read}, {read_until_end}, {close_write}.
   * Returns one outcome per read: {frame} or {end: eof|reset|truncated|timeout}. */
  async raw (args) {
    const fs = new FrameStream(await openStream(args.peer, args.protocol ?? INFER_PROTOCOL, args))
    const outcomes = []
    const readMs = args.read_timeout_ms ?? 10000
    try {
      for (const action of args.actions) {
        if (action.send_hex !== undefined) await fs.sendBytes(fromHex(action.send_hex))
        else if (action.send_frame !== undefined) {
          let header = action.send_frame
          if (action.sign_ticket) { // an open as this peer's gateway would sign it, whatever its fields
            const { session, model, gateway, route } = header
            header = { ...header, ticket: await signTicket(privateKey, { session, model, gateway, route }) }
          }
          await fs.sendBytes(encodeFrame(header, fromHex(action.payload_hex ?? '')))
        }
        else if (action.close_write) await fs.closeWrite()
        else if (action.read) {
          try {
            outcomes.push({ frame: frameJson(await fs.readFrame(readMs)) })
          } catch (err) {
            if (!(err instanceof StreamEnd)) throw err
            outcomes.push({ end: err.kind })
          }
        } else if (action.read_until_end) {
          const { frames, end } = await fs.readUntilEnd(readMs)
          outcomes.push(...frames.map((f) => ({ frame: frameJson(f) })), { end })
        } else throw new Error(`unknown action ${JSON.stringify(action)}`)
      }
    } finally {
      fs.reset() // whatever state the node left the stream in, free it on our side too
    }
    return { outcomes }
  },

  async stop () {
    setTimeout(async () => { await libp2p.stop(); process.exit(0) }, 10)
    return {}
  }
}

// --- the command loop ---------------------------------------------------------------------

function reply (obj) {
  process.stdout.write(JSON.stringify(obj) + '\n')
}

createInterface({ input: process.stdin }).on('line', (line) => {
  let request
  try {
    request = JSON.parse(line)
  } catch {
    reply({ id: null, ok: false, error: `not JSON: ${line}` })
    return
  }
  const handler = commands[request.cmd]
  if (handler === undefined) {
    reply({ id: request.id, ok: false, error: `unknown command ${request.cmd}` })
    return
  }
  handler(request).then(
    (result) => reply({ id: request.id, ok: true, ...result }),
    (err) => reply({ id: request.id, ok: false, error: `${err.name}: ${err.message}`, code: err.code ?? null })
  )
}).on('close', async () => { // the test process went away: so do we
  await libp2p.stop()
  process.exit(0)
})

reply({ event: 'ready', peer: me, addrs: libp2p.getMultiaddrs().map(String), node: process.version })
