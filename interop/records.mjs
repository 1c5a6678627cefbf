// NodeRecords, model keys and DHT keys, written from docs/PROTOCOL.md sections 1-4
// (not from the Python code): if this file needs something the document does not say,
// the document is wrong.

import { createHash } from 'node:crypto'
import * as cbor from 'cborg'
import { publicKeyFromRaw } from '@libp2p/crypto/keys'
import { base58btc } from 'multiformats/bases/base58'
import { base32 } from 'multiformats/bases/base32'
import { CID } from 'multiformats/cid'
import * as Digest from 'multiformats/hashes/digest'

export const SIGNING_PREFIX = new Uint8Array([...new TextEncoder().encode('shardmesh-record/1'), 0])
export const MAX_RECORD_BYTES = 16384
export const MAX_RECORD_LIFETIME = 600 // seconds
export const NAMESPACE = 'shardmesh'
const STATES = ['joining', 'online', 'draining']
const RAW_CODEC = 0x55
const SHA2_256 = 0x12
// identity multihash (0x00), 36 bytes, protobuf PublicKey { Type: Ed25519, Data: 32 bytes }
const ED25519_PEER_PREFIX = [0x00, 0x24, 0x08, 0x01, 0x12, 0x20]

const utf8 = new TextEncoder()
const sha256 = (bytes) => new Uint8Array(createHash('sha256').update(bytes).digest())
const concat = (...parts) => {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0))
  let at = 0
  for (const p of parts) { out.set(p, at); at += p.length }
  return out
}

export class RecordError extends Error {
  constructor (reason, detail) {
    super(`${reason}: ${detail}`)
    this.reason = reason
  }
}

/** The raw Ed25519 public key inside a peer id (section 1): its last 32 bytes. */
export function publicKeyOfPeer (peer) {
  let bytes
  try {
    bytes = base58btc.baseDecode(peer)
  } catch {
    throw new RecordError('malformed', `${peer} is not base58btc`)
  }
  if (bytes.length !== 38 || ED25519_PEER_PREFIX.some((b, i) => bytes[i] !== b)) {
    throw new RecordError('bad-signature', `${peer} does not embed an Ed25519 key`)
  }
  return bytes.subarray(6)
}

/** `/shardmesh/` + base32(sha256(model \0 peer)[:20]): the record's DHT key (section 4.2). */
export function recordKey (model, peer) {
  const digest = sha256(concat(utf8.encode(model), new Uint8Array([0]), utf8.encode(peer))).subarray(0, 20)
  return `/${NAMESPACE}/${base32.baseEncode(digest)}`
}

/** CIDv1 (raw, sha2-256) of "shardmesh/<model>/block/<i>": the provider key of block i. */
export function blockCid (model, block) {
  const digest = sha256(utf8.encode(`shardmesh/${model}/block/${block}`))
  return CID.createV1(RAW_CODEC, Digest.create(SHA2_256, digest))
}

export function recordsTopic (model) {
  return `shardmesh/${model}/records/1`
}

// --- checking a body (section 3.2) -----------------------------------------------------

const isInt = (v) => (typeof v === 'number' && Number.isInteger(v)) || typeof v === 'bigint'
const isNumber = (v) => (typeof v === 'number' && Number.isFinite(v)) || typeof v === 'bigint'
const FIELDS = {
  peer: 'text', addrs: 'texts', model: 'text', start: 'uint', end: 'uint', total_blocks: 'uint',
  state: 'text', throughput: 'number', cache_tokens_free: 'uint', backend: 'text', device: 'text',
  dtype: 'text', rtt: 'numbers', version: 'text', seq: 'uint', expires: 'number'
}
const CHECKS = {
  text: (v) => typeof v === 'string',
  texts: (v) => Array.isArray(v) && v.every((x) => typeof x === 'string'),
  uint: (v) => isInt(v) && v >= 0,
  number: isNumber,
  numbers: (v) => v !== null && typeof v === 'object' && !Array.isArray(v) && !(v instanceof Uint8Array) &&
    Object.values(v).every(isNumber)
}

// The bounds of section 3.2: every text at most 256 bytes of UTF-8, at most 16 addresses
// each ending in /p2p/<peer>, at most 32 rtt entries in [0, 60000] ms, at most 16 limits
// in [1, 2^31 - 1].
const MAX_TEXT_BYTES = 256
const MAX_ADDRS = 16
const MAX_RTT_ENTRIES = 32
const MAX_RTT_MS = 60000
const MAX_LIMITS = 16
const MAX_LIMIT_VALUE = 2 ** 31 - 1
const MAX_SUSPECTS = 8
const shortText = (v) => typeof v === 'string' && utf8.encode(v).length <= MAX_TEXT_BYTES

function checkBounds (m) {
  for (const name of ['peer', 'model', 'state', 'backend', 'device', 'dtype', 'version']) {
    if (!shortText(m[name])) throw new RecordError('malformed', `field ${name} is longer than ${MAX_TEXT_BYTES} bytes`)
  }
  if (typeof m.api === 'string' && !shortText(m.api)) throw new RecordError('malformed', 'api is too long')
  if (m.addrs.length > MAX_ADDRS) throw new RecordError('malformed', `${m.addrs.length} addrs`)
  if (!m.addrs.every((a) => shortText(a) && a.endsWith(`/p2p/${m.peer}`))) {
    throw new RecordError('malformed', 'an address is too long or does not end in /p2p/<peer>')
  }
  const rtt = Object.entries(m.rtt)
  if (rtt.length > MAX_RTT_ENTRIES || !rtt.every(([k, ms]) => shortText(k) && ms >= 0 && ms <= MAX_RTT_MS)) {
    throw new RecordError('malformed', 'rtt')
  }
  const limits = Object.entries(m.limits ?? {})
  if (limits.length > MAX_LIMITS || !limits.every(([k, v]) => shortText(k) && v >= 1 && v <= MAX_LIMIT_VALUE)) {
    throw new RecordError('malformed', 'limits')
  }
  const suspects = m.suspects ?? []
  if (!Array.isArray(suspects) || suspects.length > MAX_SUSPECTS || !suspects.every((s) => shortText(s) && s !== m.peer)) {
    throw new RecordError('malformed', 'suspects')
  }
}

function parseBody (body) {
  let m
  try {
    m = cbor.decode(body)
  } catch (err) {
    throw new RecordError('malformed', `body is not CBOR (${err.message})`)
  }
  if (m === null || typeof m !== 'object' || Array.isArray(m) || m instanceof Uint8Array) {
    throw new RecordError('malformed', 'body is not a map')
  }
  for (const [name, kind] of Object.entries(FIELDS)) {
    if (!(name in m)) throw new RecordError('malformed', `missing field ${name}`)
    if (!CHECKS[kind](m[name])) throw new RecordError('malformed', `field ${name} is not a ${kind}`)
  }
  if (m.api !== undefined && m.api !== null && typeof m.api !== 'string') throw new RecordError('malformed', 'api')
  if (m.limits !== undefined && !(CHECKS.numbers(m.limits) && Object.values(m.limits).every(isInt))) {
    throw new RecordError('malformed', 'limits')
  }
  if (m.peer === '' || m.throughput < 0) throw new RecordError('malformed', 'empty peer or negative throughput')
  checkBounds(m)
  if (m.total_blocks > 10000 || !(m.start <= m.end && m.end <= m.total_blocks)) {
    throw new RecordError('bad-span', `[${m.start}, ${m.end}) of ${m.total_blocks}`)
  }
  if (!STATES.includes(m.state)) throw new RecordError('bad-state', m.state)
  return m
}

/**
 * Section 3.3: the record inside `envelope`, or a RecordError saying why not.
 * Async only because a libp2p key's verify may be.
 */
export async function verifyRecord (envelope, { now = Date.now() / 1000, expectedPeer, expectedModel } = {}) {
  if (!(envelope instanceof Uint8Array)) throw new RecordError('malformed', 'not bytes')
  if (envelope.length > MAX_RECORD_BYTES) throw new RecordError('oversized', `${envelope.length} bytes`)
  let outer
  try {
    outer = cbor.decode(envelope)
  } catch (err) {
    throw new RecordError('malformed', `not CBOR (${err.message})`)
  }
  if (outer === null || typeof outer !== 'object' || !(outer.body instanceof Uint8Array)) {
    throw new RecordError('malformed', 'envelope has no body bytes')
  }
  if (outer.sig === undefined) throw new RecordError('unsigned', 'no sig')
  if (!(outer.sig instanceof Uint8Array)) throw new RecordError('malformed', 'sig is not bytes')
  const record = parseBody(outer.body)
  const expires = Number(record.expires)
  if (expires < now) throw new RecordError('expired', `${(now - expires).toFixed(1)} s ago`)
  if (expires > now + MAX_RECORD_LIFETIME) throw new RecordError('expiry-too-far', `in ${expires - now} s`)
  if (expectedPeer !== undefined && record.peer !== expectedPeer) throw new RecordError('wrong-peer', record.peer)
  if (expectedModel !== undefined && record.model !== expectedModel) throw new RecordError('wrong-model', record.model)
  const key = publicKeyFromRaw(publicKeyOfPeer(record.peer))
  let ok = false
  try {
    ok = await key.verify(concat(SIGNING_PREFIX, outer.body), outer.sig)
  } catch {}
  if (!ok) throw new RecordError('bad-signature', `not signed by ${record.peer}`)
  return record
}

/** Our own record, signed with `privateKey` (an Ed25519 libp2p key): the same envelope format. */
export async function signRecord (fields, privateKey) {
  const body = cbor.encode(fields)
  parseBody(body) // what a receiver would refuse, we refuse to send
  const sig = await privateKey.sign(concat(SIGNING_PREFIX, body))
  return cbor.encode({ body, sig })
}

// --- the DHT's validator and selector for /shardmesh/ keys (section 4.2) ---------------

const keyText = (key) => new TextDecoder().decode(key)

export async function validateDhtRecord (key, value) {
  const record = await verifyRecord(value)
  const expected = recordKey(record.model, record.peer)
  if (keyText(key) !== expected) throw new RecordError('wrong-key', `${keyText(key)} is not ${expected}`)
}

export async function selectDhtRecord (key, values) {
  let best = 0
  let bestSeq = -1
  for (const [i, value] of values.entries()) {
    try {
      await validateDhtRecord(key, value)
      const seq = Number(cbor.decode(cbor.decode(value).body).seq)
      if (seq > bestSeq) { best = i; bestSeq = seq }
    } catch {}
  }
  return best
}
