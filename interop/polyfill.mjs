// js-libp2p 3 targets Node 22+. Loaded before anything else (`node --import
// ./polyfill.mjs peer.mjs`), these few globals let the interop peer run on Node 18 and 20
// too, which is what Debian 12 (apt: 18) and many CI images have.
import { webcrypto } from 'node:crypto'

// Node < 22
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve, reject
    const promise = new this((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}

// Node < 19: not global yet
if (typeof globalThis.CustomEvent !== 'function') {
  globalThis.CustomEvent = class CustomEvent extends Event {
    constructor (type, init = {}) {
      super(type, init)
      this.detail = init.detail ?? null
    }
  }
}
if (globalThis.crypto === undefined) {
  globalThis.crypto = webcrypto
}
