// The gateway's side of a push chain (docs/PROTOCOL.md 6.2): open over a route, attach to
// the last hop, step token ids in, read sampled tokens back, close.

import { peerIdFromString } from '@libp2p/peer-id'
import * as cbor from 'cborg'
import { FrameStream, int64Bytes } from './wire.mjs'

export const INFER_PROTOCOL = '/shardmesh/infer/1.0.0'

/** An error frame from the chain (or a stream that ended instead of answering). */
export class ChainError extends Error {
  constructor (code, message, peer) {
    super(`${code}: ${message}${peer ? ` (peer ${peer})` : ''}`)
    this.name = 'ChainError'
    this.code = code
    this.peer = peer
  }
}

function expectOk (frame, what) {
  const h = frame.header
  if (h.t === 'error') throw new ChainError(h.code, h.message, h.peer)
  if (h.t !== 'result' || h.ok !== true) throw new ChainError('bad_frame', `${what} answered with ${h.t}`)
}

export async function openInferStream (libp2p, peer, timeoutMs) {
  const stream = await libp2p.dialProtocol(peerIdFromString(peer), INFER_PROTOCOL, { signal: AbortSignal.timeout(timeoutMs) })
  return new FrameStream(stream)
}

const TICKET_PREFIX = new Uint8Array([...new TextEncoder().encode('shardmesh-ticket/1'), 0])

/** The gateway's signature on one chain (section 6.2, `ticket`). */
export async function signTicket (privateKey, { session, model, gateway, route }) {
  const body = cbor.encode({ session, model, gateway, route, iat: Math.floor(Date.now() / 1000) })
  const signed = new Uint8Array(TICKET_PREFIX.length + body.length)
  signed.set(TICKET_PREFIX)
  signed.set(body, TICKET_PREFIX.length)
  return cbor.encode({ body, sig: await privateKey.sign(signed) })
}

export class Chain {
  /** `route`: [{peer, start, end}], first hop first; `prompt`: token ids; `privateKey`
   * signs the tickets (the gateway's own libp2p key). */
  constructor (libp2p, { privateKey, session, model, route, prompt, maxLength, sampling = { temperature: 0 } }) {
    Object.assign(this, { libp2p, privateKey, session, model, route, prompt, maxLength, sampling })
    this.first = null
    this.last = null
  }

  async open (timeoutMs = 30000) {
    const gateway = this.libp2p.peerId.toString()
    const route = this.route.map(({ peer, start, end }) => ({ peer, start, end }))
    const header = {
      t: 'open',
      session: this.session,
      model: this.model,
      gateway,
      ticket: await signTicket(this.privateKey, { session: this.session, model: this.model, gateway, route }),
      route,
      max_length: this.maxLength,
      sampling: this.sampling,
      n_prompt: this.prompt.length
    }
    this.first = await openInferStream(this.libp2p, this.route[0].peer, timeoutMs)
    await this.first.write(header, int64Bytes(this.prompt))
    expectOk(await this.first.readFrame(timeoutMs), 'open')
    this.last = await openInferStream(this.libp2p, this.route.at(-1).peer, timeoutMs)
    await this.last.write({ t: 'attach', session: this.session })
    expectOk(await this.last.readFrame(timeoutMs), 'attach')
  }

  /** Feed `ids` at `position`; the sampled token `{ token, logprob, top }`. */
  async step (ids, position, timeoutMs = 30000) {
    await this.first.write(
      { t: 'step', session: this.session, position, want: true, dtype: 'int64', shape: [ids.length] },
      int64Bytes(ids)
    )
    const { header: h } = await this.last.readFrame(timeoutMs)
    if (h.t === 'error') throw new ChainError(h.code, h.message, h.peer)
    if (h.t !== 'result' || !Number.isInteger(h.token) || h.position !== position) {
      throw new ChainError('bad_frame', `expected the token of position ${position}, got ${JSON.stringify(h)}`)
    }
    return { token: h.token, logprob: h.logprob ?? null, top: h.top ?? [] }
  }

  /** `close` down the chain, end both our streams, and wait (bounded) for the hops to end theirs. */
  async close (timeoutMs = 10000) {
    const ends = {}
    for (const [name, fs] of [['first', this.first], ['last', this.last]]) {
      if (fs === null) continue
      try {
        if (name === 'first') await fs.write({ t: 'close', session: this.session })
        await fs.closeWrite()
        ends[name] = (await fs.readUntilEnd(timeoutMs)).end
      } catch (err) {
        ends[name] = `failed: ${err.message}`
      }
    }
    return ends
  }

  /** Greedy generation: the prompt as one step, then each token fed back. */
  async generate (n, timeoutMs = 30000) {
    const tokens = [(await this.step(this.prompt, 0, timeoutMs)).token]
    while (tokens.length < n) {
      tokens.push((await this.step([tokens.at(-1)], this.prompt.length + tokens.length - 1, timeoutMs)).token)
    }
    return tokens
  }
}
