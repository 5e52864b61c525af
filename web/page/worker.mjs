// The page's worker: downloads the model, opens it with ONNX Runtime Web (WebAssembly, threads), parses scans and
// segments them, so that the page stays responsive while a scan takes seconds.
// Messages in: {type: 'load', modelUrl} once, then {type: 'segment', bytes (ArrayBuffer), name}.
// Messages out: {type: 'progress', stage, loaded?, total?}, {type: 'model', seconds, bytes, threads},
// {type: 'result', ...}, {type: 'error', message}.
import * as ort from './ort/ort.wasm.min.mjs';
import { InputError, maskFileBytes, parseNifti } from '../lib/nifti.mjs';
import { checkInterface, ModelError, oneLine, segment } from '../lib/segment.mjs';
import { readBody } from './read-body.mjs';
import { checkScan } from './scan-check.mjs';

// Threads share the machine with the page's main thread and the viewer; more than 8 rarely pays off.
const MAX_THREADS = 8;

let modelPromise = null;

/** Post a progress message. */
function progress(stage, loaded = null, total = null) {
  self.postMessage({ type: 'progress', stage, loaded, total });
}

/** The model file's bytes, with progress as they arrive. */
async function downloadModel(url) {
  let response;
  try {
    response = await fetch(url);
  } catch (error) {
    throw new ModelError(`cannot download the model ${url} (${oneLine(error.message)})`);
  }
  if (!response.ok) throw new ModelError(`cannot download the model ${url} (HTTP ${response.status})`);
  return readBody(response, (loaded, total) => progress('model', loaded, total));
}

/** ONNX Runtime's WebAssembly settings: every core the browser offers (threads need a cross-origin isolated page). */
function configureRuntime() {
  const cores = navigator.hardwareConcurrency || 1;
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(cores, MAX_THREADS) : 1;
  ort.env.logLevel = 'error';
  return ort.env.wasm.numThreads;
}

/** Download the model and open a session of it: {session, timings}. */
async function openModel(url) {
  const threads = configureRuntime();
  const started = performance.now();
  const bytes = await downloadModel(url);
  const downloaded = performance.now();
  progress('session');
  let session;
  try {
    session = await ort.InferenceSession.create(bytes, { executionProviders: ['wasm'], graphOptimizationLevel: 'all' });
  } catch (error) {
    throw new ModelError(`the model is not a readable ONNX model (${oneLine(error.message)})`);
  }
  checkInterface(session);
  const opened = performance.now();
  const timings = { downloadSeconds: (downloaded - started) / 1000, sessionSeconds: (opened - downloaded) / 1000 };
  self.postMessage({ type: 'model', bytes: bytes.length, threads, ...timings });
  return session;
}

/** The mask's centre in world coordinates (mm), where the viewer puts its crosshair; null for an empty mask. */
function maskCentre(mask, dims, affine) {
  const sum = [0, 0, 0];
  let count = 0;
  for (let k = 0, at = 0; k < dims[2]; k += 1) {
    for (let j = 0; j < dims[1]; j += 1) {
      for (let i = 0; i < dims[0]; i += 1, at += 1) {
        if (mask[at] === 0) continue;
        sum[0] += i;
        sum[1] += j;
        sum[2] += k;
        count += 1;
      }
    }
  }
  if (count === 0) return null;
  const voxel = sum.map((v) => v / count);
  return [0, 1, 2].map((row) => affine[row][0] * voxel[0] + affine[row][1] * voxel[1] + affine[row][2] * voxel[2]
    + affine[row][3]);
}

/** The open session, once the model has loaded; a failed load as a ModelError naming the model. */
async function loadedModel() {
  if (modelPromise === null) throw new ModelError('model: not loaded (the page sends no load message)');
  try {
    return await modelPromise;
  } catch (error) {
    throw new ModelError(`model: ${describe(error)}`);
  }
}

/**
 * The scan's mask as a NIfTI file, with the volume, QC score and the seconds the page shows: from the scan's bytes to
 * the mask file, without the wait for the model.
 */
async function segmentScan(bytes) {
  const started = performance.now();
  progress('parse');
  checkScan(bytes);
  const scan = parseNifti(bytes);
  const parsed = performance.now();
  progress('wait-model');
  const session = await loadedModel();
  const ready = performance.now();
  progress('run');
  const result = await segment(ort, session, scan);
  const segmented = performance.now();
  const maskFile = maskFileBytes(scan, result.mask, { gzip: true });
  const finished = performance.now();
  const centre = maskCentre(result.mask, scan.dims, scan.affine);
  const timings = { parseSeconds: (parsed - started) / 1000, segmentSeconds: (segmented - ready) / 1000,
    encodeSeconds: (finished - segmented) / 1000 };
  const seconds = timings.parseSeconds + timings.segmentSeconds + timings.encodeSeconds;
  return { maskFile, volumeMl: result.volumeMl, score: result.score, dims: scan.dims, centre, seconds, timings };
}

/** A failure as one line: what it was and, for an unexpected one, its kind. */
function describe(error) {
  const known = error instanceof InputError || error instanceof ModelError;
  const message = oneLine(error?.message ?? error);
  return known ? message : `${error?.name ?? 'Error'}: ${message}`;
}

self.onmessage = async ({ data }) => {
  if (data.type === 'load') {
    modelPromise = openModel(data.modelUrl);
    // A model that fails is reported now, and again for every scan that waits on it.
    modelPromise.catch((error) => {
      self.postMessage({ type: 'error', message: `model: ${describe(error)}`, model: true });
    });
    return;
  }
  if (data.type === 'segment') {
    try {
      const result = await segmentScan(new Uint8Array(data.bytes));
      self.postMessage({ type: 'result', ...result }, [result.maskFile.buffer]);
    } catch (error) {
      self.postMessage({ type: 'error', message: describe(error) });
    }
  }
};
