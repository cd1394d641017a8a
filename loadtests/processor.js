'use strict';
// Artillery hooks for the Koinonia load test (loaded by workload.yml).
//
// Telnyx webhooks are signed here, per request, exactly as Telnyx (and the sandbox) sign
// them: Ed25519 over `<unix seconds>|<raw body>`, base64, in `telnyx-signature-ed25519`
// with the timestamp in `telnyx-timestamp`. The key is the sandbox's (the runner passes
// its 32-byte seed, base64, in LOADTEST_TELNYX_SEED, and gives the API its public half in
// TELNYX_PUBLIC_KEY): the API verifies every request for real, nothing is bypassed.
// Bodies are ASCII JSON with fresh event ids, so each one is stored as a new event.

const crypto = require('node:crypto');

// DER prefix of a PKCS#8 Ed25519 private key; the 32-byte seed follows it.
const PKCS8_ED25519_PREFIX = Buffer.from('302e020100300506032b657004220420', 'hex');

let signingKey = null;

function key() {
  if (signingKey === null) {
    const seed = Buffer.from(process.env.LOADTEST_TELNYX_SEED || '', 'base64');
    if (seed.length !== 32) {
      throw new Error('LOADTEST_TELNYX_SEED must be the base64 of a 32-byte Ed25519 seed');
    }
    signingKey = crypto.createPrivateKey({
      key: Buffer.concat([PKCS8_ED25519_PREFIX, seed]),
      format: 'der',
      type: 'pkcs8'
    });
  }
  return signingKey;
}

let sequence = 0;

function iso(ms) {
  return new Date(ms).toISOString();
}

function signInto(requestParams, event) {
  // Artillery templates string bodies after the hooks: JSON never contains "{{", so the
  // bytes sent are the bytes signed.
  const body = JSON.stringify(event);
  const timestamp = String(Math.floor(Date.now() / 1000));
  const signature = crypto
    .sign(null, Buffer.from(`${timestamp}|${body}`, 'utf8'), key())
    .toString('base64');
  delete requestParams.json;
  requestParams.body = body;
  requestParams.headers = Object.assign({}, requestParams.headers, {
    'content-type': 'application/json',
    'user-agent': 'telnyx-webhooks',
    'telnyx-signature-ed25519': signature,
    'telnyx-timestamp': timestamp
  });
}

function envelope(eventType, payload, deliveredTo) {
  return {
    data: {
      event_type: eventType,
      id: crypto.randomUUID(),
      occurred_at: iso(Date.now()),
      record_type: 'event',
      payload
    },
    meta: { attempt: 1, delivered_to: deliveredTo }
  };
}

// A delivery receipt (`message.sent` or `message.finalized`, as Telnyx sends for every
// text) for a text from the church's number to one of its members. The Telnyx message id
// is new, so the worker applies it without finding a row: the API's work (verify, store
// once) and the worker's (claim, look up, seal) are what is loaded.
function signReceipt(requestParams, context, ee, next) {
  const now = Date.now();
  const finalized = Math.random() < 0.5;
  const payload = {
    completed_at: finalized ? iso(now) : null,
    cost: finalized ? { amount: '0.0040', currency: 'USD' } : null,
    direction: 'outbound',
    encoding: 'GSM-7',
    errors: [],
    from: { carrier: 'Telnyx', line_type: 'Wireless', phone_number: context.vars.church_number },
    id: crypto.randomUUID(),
    media: [],
    messaging_profile_id: null,
    parts: 1,
    received_at: iso(now - 2000),
    record_type: 'message',
    sent_at: iso(now - 1700),
    tags: [],
    text: 'Grace Fellowship: Sunday service moves to 10:30 this week. Reply STOP to opt out.',
    to: [
      {
        carrier: 'T-MOBILE USA, INC.',
        line_type: 'Wireless',
        phone_number: context.vars.member_phone,
        status: finalized ? 'delivered' : 'sent'
      }
    ],
    type: 'SMS',
    valid_until: iso(now + 3600 * 1000),
    webhook_failover_url: null,
    webhook_url: requestParams.url
  };
  const eventType = finalized ? 'message.finalized' : 'message.sent';
  signInto(requestParams, envelope(eventType, payload, requestParams.url));
  return next();
}

// A member texts the church's number (not a keyword): the worker appends it to the
// member's conversation, which the staff scenarios then list.
function signInbound(requestParams, context, ee, next) {
  sequence += 1;
  const text = `Thank you, see you on Sunday! (load test ${process.pid}-${sequence})`;
  const payload = {
    direction: 'inbound',
    encoding: 'GSM-7',
    errors: [],
    from: { carrier: 'T-MOBILE USA, INC.', line_type: 'Wireless', phone_number: context.vars.member_phone },
    id: crypto.randomUUID(),
    media: [],
    parts: 1,
    received_at: iso(Date.now()),
    record_type: 'message',
    text,
    to: [{ phone_number: context.vars.church_number, status: 'webhook_delivered' }],
    type: 'SMS'
  };
  signInto(requestParams, envelope('message.received', payload, requestParams.url));
  return next();
}

// Broadcasts carry an Idempotency-Key, as clients are told to send one.
function idempotencyKey(requestParams, context, ee, next) {
  requestParams.headers = Object.assign({}, requestParams.headers, {
    'idempotency-key': crypto.randomUUID()
  });
  return next();
}

module.exports = { signReceipt, signInbound, idempotencyKey };
