// Frames of /shardmesh/infer/1.0.0 and /shardmesh/swarm/1.0.0, from docs/PROTOCOL.md 6.1:
//   u32 big-endian header length | CBOR map header | header.nbytes raw bytes
// over a js-libp2p 3.x stream, with a deadline on every read.

import * as cbor from 'cborg'

export const MAX_HEADER_BYTES = 65536

export function encodeFrame (header, payload = new Uint8Array(0)) {
  const head = cbor.encode(payload.length > 0 ? { ...header, nbytes: payload.length } : header)
  const out = new Uint8Array(4 + head.length + payload.length)
  new DataView(out.buffer).setUint32(0, head.length)
  out.set(head, 4)
  out.set(payload, 4 + head.length)
  return out
}

/** How a read ended without a frame: `eof` (clean close between frames), `reset`,
 * `truncated` (the stream ended inside a frame) or `timeout`. */
export class StreamEnd extends Error {
  constructor (kind, detail = '') {
    super(`${kind}${detail ? `: ${detail}` : ''}`)
    this.kind = kind
  }
}

/** A libp2p stream read as frames. Bytes are pumped from the stream's async iterator
 * into one buffer; reads wait on it with a deadline. */
export class FrameStream {
  constructor (stream, { maxPayload = 64 << 20 } = {}) {
    this.stream = stream
    this.maxPayload = maxPayload
    this.buf = new Uint8Array(0)
    this.end = null // 'eof' | 'reset' once the stream can give no more bytes
    this.wake = () => {}
    this.pumping = this.pump()
  }

  async pump () {
    try {
      for await (const chunk of this.stream) {
        const bytes = chunk instanceof Uint8Array ? chunk : chunk.subarray()
        const joined = new Uint8Array(this.buf.length + bytes.length)
        joined.set(this.buf)
        joined.set(bytes, this.buf.length)
        this.buf = joined
        this.wake()
      }
      this.end = 'eof'
    } catch (err) {
      this.end = 'reset'
      this.endError = err
    }
    this.wake()
  }

  async fill (n, deadline, frameStart = false) {
    while (this.buf.length < n) {
      if (this.end !== null) {
        if (this.end === 'eof' && frameStart && this.buf.length === 0) throw new StreamEnd('eof')
        throw new StreamEnd(this.end === 'reset' ? 'reset' : 'truncated', `${this.buf.length} of ${n} bytes`)
      }
      const left = deadline - Date.now()
      if (left <= 0) throw new StreamEnd('timeout', `${this.buf.length} of ${n} bytes`)
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, left)
        this.wake = () => { clearTimeout(timer); resolve() }
      })
    }
  }

  take (n) {
    const out = this.buf.slice(0, n)
    this.buf = this.buf.subarray(n)
    return out
  }

  /** The next frame `{ header, payload }`; throws StreamEnd when there is none. */
  async readFrame (timeoutMs = 30000) {
    const deadline = Date.now() + timeoutMs
    await this.fill(4, deadline, true)
    const headLen = new DataView(this.buf.buffer, this.buf.byteOffset, 4).getUint32(0)
    if (headLen === 0 || headLen > MAX_HEADER_BYTES) throw new Error(`header of ${headLen} bytes`)
    await this.fill(4 + headLen, deadline)
    this.take(4)
    const header = cbor.decode(this.take(headLen))
    const nbytes = Number(header.nbytes ?? 0)
    if (!Number.isInteger(nbytes) || nbytes < 0 || nbytes > this.maxPayload) throw new Error(`bad nbytes ${nbytes}`)
    await this.fill(nbytes, deadline)
    return { header, payload: this.take(nbytes) }
  }

  /** Frames until the stream ends; `{ frames, end }` where end is a StreamEnd kind. */
  async readUntilEnd (timeoutMs = 30000) {
    const deadline = Date.now() + timeoutMs
    const frames = []
    for (;;) {
      try {
        frames.push(await this.readFrame(Math.max(1, deadline - Date.now())))
      } catch (err) {
        if (err instanceof StreamEnd) return { frames, end: err.kind }
        throw err
      }
    }
  }

  async sendBytes (bytes) {
    if (!this.stream.send(bytes)) await this.stream.onDrain()
  }

  async write (header, payload) {
    await this.sendBytes(encodeFrame(header, payload))
  }

  /** End our side: the peer reads an end of stream. */
  async closeWrite () {
    await this.stream.close()
  }

  reset () {
    this.stream.abort(new Error('reset by the interop peer'))
  }
}

/** int64 little-endian bytes of token ids (section 6.2), and back. */
export function int64Bytes (ids) {
  const out = new Uint8Array(ids.length * 8)
  const view = new DataView(out.buffer)
  ids.forEach((id, i) => view.setBigInt64(i * 8, BigInt(id), true))
  return out
}
