// The heartseg page: pick, drop or link (?scan=URL) a NIfTI scan; a worker segments it in the tab; NiiVue shows the
// scan with the mask over it. Elements scripts read: #status ("done" or "error: ..."), #volume-ml, #seconds.
import { MULTIPLANAR_TYPE, Niivue, NVImage, SHOW_RENDER } from '@niivue/niivue';
import { readBody } from './read-body.mjs';
import { checkFileSize } from './scan-check.mjs';

const MODEL_URL = 'model.onnx';
const NIFTI_NAME = /\.nii(\.gz)?$/i;
const MASK_COLOUR = 'red';
const MASK_OPACITY = 0.55;

const $ = (id) => document.getElementById(id);
const ui = {
  status: $('status'),
  progress: $('progress'),
  file: $('file'),
  drop: $('drop'),
  volume: $('volume-ml'),
  score: $('score'),
  seconds: $('seconds'),
  download: $('download'),
  modelInfo: $('model-info'),
  canvas: $('viewer-canvas'),
  viewerNote: $('viewer-note'),
};

// What scripts may read besides the elements: timings of the model's start and of the last scan.
const hook = { model: null, scan: null };
window.heartseg = hook;

// scanStarted: once a scan is on its way the status line is the scan's, and the model's loading stays off it.
const state = { worker: null, job: null, scanStarted: false, maskUrl: null, maskName: 'mask.nii.gz', viewer: null,
  ticker: null };

/** Show a status line; kind 'error' marks it red, 'done' green. */
function setStatus(text, kind = 'busy') {
  ui.status.textContent = text;
  ui.status.dataset.kind = kind;
}

/** Show progress: a fraction from 0 to 1, null for a running step of unknown length, undefined to hide it. */
function setProgress(fraction) {
  ui.progress.hidden = fraction === undefined;
  if (fraction === null) ui.progress.removeAttribute('value');
  else if (fraction !== undefined) ui.progress.value = fraction;
}

/** Count seconds on the status line while a step of unknown length runs. */
function tick(text) {
  clearInterval(state.ticker);
  const started = performance.now();
  const show = () => setStatus(`${text} ${((performance.now() - started) / 1000).toFixed(0)} s`);
  show();
  state.ticker = setInterval(show, 500);
}

/** Stop the seconds counter. */
function stopTicking() {
  clearInterval(state.ticker);
  state.ticker = null;
}

/** Report a failure on the page and in #status. */
function fail(message) {
  stopTicking();
  setProgress(undefined);
  setStatus(`error: ${message}`, 'error');
  state.job = null;
  ui.file.disabled = false;
}

const MiB = 2 ** 20;

/** The worker's progress messages, on the status line and the progress bar. */
function onProgress({ stage, loaded, total }) {
  if (stage === 'model' && !state.scanStarted) {
    const of = total ? ` of ${(total / MiB).toFixed(1)}` : '';
    setStatus(`downloading the model: ${(loaded / MiB).toFixed(1)}${of} MiB`);
    setProgress(total ? loaded / total : null);
  } else if (stage === 'session' && !state.scanStarted) {
    setStatus('starting the model');
    setProgress(null);
  } else if (stage === 'parse') {
    setStatus('reading the scan');
    setProgress(null);
  } else if (stage === 'wait-model') {
    setStatus('waiting for the model to load');
  } else if (stage === 'run') {
    tick('segmenting:');
  }
}

/** The model is open: say so, and how long it took. */
function onModel({ bytes, threads, downloadSeconds, sessionSeconds }) {
  hook.model = { bytes, threads, downloadSeconds, sessionSeconds };
  ui.modelInfo.textContent = `Model: ${(bytes / MiB).toFixed(1)} MiB, downloaded in ${downloadSeconds.toFixed(1)} s, `
    + `started in ${sessionSeconds.toFixed(1)} s; ONNX Runtime Web (WebAssembly, ${threads} `
    + `thread${threads === 1 ? '' : 's'}${self.crossOriginIsolated ? '' : ': the page is not cross-origin isolated'}).`;
  if (!state.scanStarted) {
    setProgress(undefined);
    setStatus('ready: drop or choose a scan', 'ready');
  }
}

/** Start the worker and have it load the model at once, while the user picks a scan. */
function startWorker() {
  const worker = new Worker('worker.js', { type: 'module' });
  worker.onmessage = ({ data }) => {
    if (data.type === 'progress') onProgress(data);
    else if (data.type === 'model') onModel(data);
    else if (data.type === 'result') state.job?.resolve(data);
    else if (data.type === 'error' && data.model && state.job === null) fail(data.message);
    else if (data.type === 'error') state.job?.reject(new Error(data.message));
  };
  worker.onerror = (event) => {
    event.preventDefault();
    const why = event.message || 'it could not load its scripts';
    if (state.job) state.job.reject(new Error(`the page's worker stopped: ${why}`));
    else fail(`the page's worker stopped: ${why}`);
  };
  worker.postMessage({ type: 'load', modelUrl: new URL(MODEL_URL, document.baseURI).href });
  setStatus('downloading the model');
  setProgress(null);
  return worker;
}

/** The viewer (NiiVue on a WebGL2 canvas); an Error when the browser has no WebGL2. */
async function viewer() {
  if (state.viewer) return state.viewer;
  if (!document.createElement('canvas').getContext('webgl2')) {
    throw new Error('the viewer needs WebGL2, which this browser has turned off');
  }
  const nv = new Niivue({
    backColor: [0.07, 0.08, 0.1, 1],
    multiplanarShowRender: SHOW_RENDER.ALWAYS,
    multiplanarLayout: MULTIPLANAR_TYPE.GRID,
    crosshairColor: [0.3, 0.85, 1, 0.7],
    show3Dcrosshair: true,
    dragAndDropEnabled: false,
    isColorbar: false,
    loadingText: '',
  });
  await nv.attachToCanvas(ui.canvas);
  nv.setSliceType(nv.sliceTypeMultiplanar);
  state.viewer = nv;
  return nv;
}

/** Run a viewer step; a failure there leaves the segmentation's results as they are and says why. */
async function withViewer(step) {
  try {
    await step(await viewer());
    ui.viewerNote.hidden = true;
  } catch (error) {
    ui.viewerNote.textContent = `The scan cannot be shown: ${error.message}. The segmentation itself is unaffected.`;
    ui.viewerNote.hidden = false;
  }
}

/** Show the scan with the mask over it, the crosshair at the mask's centre (the earlier scan removed). */
function showScan(scanBytes, maskFile, centre) {
  return withViewer(async (nv) => {
    while (nv.volumes.length > 0) nv.removeVolume(nv.volumes[0]);
    nv.addVolume(await NVImage.loadFromUrl({ url: scanBytes }));
    nv.addVolume(await NVImage.loadFromUrl({ url: maskFile.slice().buffer, name: 'mask.nii.gz', colormap: MASK_COLOUR,
      opacity: MASK_OPACITY, cal_min: 0.5, cal_max: 1 }));
    if (centre) nv.scene.crosshairPos = nv.mm2frac(centre);
    nv.drawScene();
  });
}

/** Clear the last scan's results, its download and its view. */
function clearResults() {
  for (const element of [ui.volume, ui.score, ui.seconds]) element.textContent = '';
  ui.download.disabled = true;
  if (state.maskUrl) URL.revokeObjectURL(state.maskUrl);
  state.maskUrl = null;
  hook.scan = null;
  const nv = state.viewer;
  if (nv && nv.volumes.length > 0) {
    while (nv.volumes.length > 0) nv.removeVolume(nv.volumes[0]);
    nv.drawScene();
  }
}

/** The mask file's name for a scan's name: la_029.nii.gz -> la_029_mask.nii.gz. */
function maskName(scanName) {
  const stem = scanName.replace(NIFTI_NAME, '').replace(/[^\w.-]+/g, '_') || 'scan';
  return `${stem}_mask.nii.gz`;
}

/** Show a result: volume, QC score, seconds, the download, and the scan with its mask in the viewer. */
async function showResult(result, scanBytes) {
  stopTicking();
  setProgress(undefined);
  ui.volume.textContent = result.volumeMl.toFixed(2);
  ui.score.textContent = result.score.toFixed(3);
  ui.seconds.textContent = result.seconds.toFixed(2);
  state.maskUrl = URL.createObjectURL(new Blob([result.maskFile], { type: 'application/gzip' }));
  ui.download.disabled = false;
  hook.scan = { volumeMl: result.volumeMl, score: result.score, seconds: result.seconds, dims: result.dims,
    ...result.timings };
  // The viewer starts only now: drawing on a machine without a graphics card would slow the model down.
  await showScan(scanBytes, result.maskFile, result.centre);
  setStatus('done', 'done');
}

/** Segment a scan's bytes (an ArrayBuffer); name is the file's name, for the mask's. */
async function segmentBytes(bytes, name) {
  clearResults();
  state.maskName = maskName(name);
  const copy = bytes.slice(0); // the viewer's; the worker takes the original
  const done = new Promise((resolve, reject) => {
    state.job = { resolve, reject };
  });
  state.worker.postMessage({ type: 'segment', bytes, name }, [bytes]);
  try {
    const result = await done;
    await showResult(result, copy);
  } catch (error) {
    fail(error.message);
    return;
  }
  state.job = null;
  ui.file.disabled = false;
}

/** Segment a file the user chose or dropped. */
async function segmentFile(file) {
  if (state.job) return;
  state.scanStarted = true;
  ui.file.disabled = true;
  setStatus('reading the file');
  setProgress(null);
  let bytes;
  try {
    if (!NIFTI_NAME.test(file.name)) throw new Error(`${file.name}: not a NIfTI file (expected .nii or .nii.gz)`);
    checkFileSize(file.size);
    bytes = await file.arrayBuffer();
  } catch (error) {
    fail(error.message);
    return;
  }
  await segmentBytes(bytes, file.name);
}

/** The bytes at a URL (the server must allow this page's origin: CORS), with download progress. */
async function download(url) {
  let response;
  try {
    response = await fetch(url, { mode: 'cors' });
  } catch (error) {
    throw new Error(`cannot download ${url} (${error.message}; a scan on another server must allow this page `
      + 'with CORS)');
  }
  if (!response.ok) throw new Error(`cannot download ${url} (HTTP ${response.status})`);
  const declared = Number(response.headers.get('Content-Length')) || null;
  if (declared) checkFileSize(declared);
  const bytes = await readBody(response, (loaded, total) => {
    checkFileSize(loaded);
    setStatus(`downloading the scan: ${(loaded / MiB).toFixed(1)} MiB`);
    setProgress(total ? loaded / total : null);
  });
  return bytes.buffer;
}

/** Segment the scan ?scan=URL names. */
async function segmentLinked(link) {
  ui.file.disabled = true;
  state.scanStarted = true;
  state.job = { resolve() {}, reject() {} }; // busy while the scan downloads
  const url = new URL(link, document.baseURI);
  const name = decodeURIComponent(url.pathname.split('/').pop() || 'scan.nii.gz');
  let bytes;
  try {
    bytes = await download(url.href);
  } catch (error) {
    fail(error.message);
    return;
  }
  await segmentBytes(bytes, name);
}

/** Save the mask, named after the scan. */
function saveMask() {
  if (!state.maskUrl) return;
  const link = document.createElement('a');
  link.href = state.maskUrl;
  link.download = state.maskName;
  document.body.append(link);
  link.click();
  link.remove();
}

/** Wire the file picker, drag and drop over the whole page, and the download button. */
function wireInputs() {
  ui.file.addEventListener('change', () => {
    if (ui.file.files.length > 0) segmentFile(ui.file.files[0]);
    ui.file.value = '';
  });
  document.addEventListener('dragover', (event) => {
    event.preventDefault();
    ui.drop.classList.add('over');
  });
  document.addEventListener('dragleave', () => ui.drop.classList.remove('over'));
  document.addEventListener('drop', (event) => {
    event.preventDefault();
    ui.drop.classList.remove('over');
    const files = event.dataTransfer?.files ?? [];
    if (files.length !== 1) {
      if (!state.job) {
        state.scanStarted = true;
        fail('drop one NIfTI file (.nii or .nii.gz)');
      }
      return;
    }
    segmentFile(files[0]);
  });
  ui.download.addEventListener('click', saveMask);
}

wireInputs();
state.worker = startWorker();
const link = new URLSearchParams(window.location.search).get('scan');
if (link) segmentLinked(link);
