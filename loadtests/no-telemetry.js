'use strict';
// Preloaded into artillery (NODE_OPTIONS=--require) by loadtests/runner.py.
//
// Artillery 2.0.21 sends a telemetry event to PostHog at exit even with
// ARTILLERY_DISABLE_TELEMETRY set (it then only anonymises it). Without a route to the
// internet each run then waits ~12 s for the client's retries before exiting. Artillery
// loads the client in a try/catch and uses no-op functions when it cannot, so refusing
// to resolve `posthog-node` turns telemetry off without touching artillery itself.

const Module = require('node:module');

const resolve = Module._resolveFilename;
Module._resolveFilename = function resolveWithoutTelemetry(request, ...rest) {
  if (request === 'posthog-node') {
    const error = new Error('telemetry is off in the Koinonia load tests');
    error.code = 'MODULE_NOT_FOUND';
    throw error;
  }
  return resolve.call(this, request, ...rest);
};
