// Segment a parsed scan with the end-to-end heartseg model (scan in, mask out), with any ONNX Runtime
// JavaScript module: onnxruntime-node here, onnxruntime-web in a browser page.
import { determinant3 } from './nifti.mjs';
import { canonicalMapping, fromCanonical, toCanonical } from './orient.mjs';

/** A model file that is missing, unreadable or lacks the end-to-end interface (exit code 2). */
export class ModelError extends Error {
  constructor(message) {
    super(message);
    this.name = 'ModelError';
  }
}

export const MODEL_INPUTS = ['image', 'spacing'];
export const MODEL_OUTPUTS = ['mask', 'probability', 'score'];

/** A message on one line (ONNX Runtime's errors often span several). */
export function oneLine(message) {
  return String(message).split('\n').map((line) => line.trim()).filter(Boolean).join(' ');
}

/** Throw ModelError unless the session has the end-to-end model's inputs and outputs. */
export function checkInterface(session) {
  const lacks = (wanted, names) => wanted.some((name) => !names.includes(name));
  if (lacks(MODEL_INPUTS, session.inputNames) || lacks(MODEL_OUTPUTS, session.outputNames)) {
    throw new ModelError(`not the end-to-end heartseg model: it needs inputs ${MODEL_INPUTS.join(', ')} and outputs `
      + `${MODEL_OUTPUTS.join(', ')}; it has inputs ${session.inputNames.join(', ')} and outputs `
      + `${session.outputNames.join(', ')}`);
  }
}

/** The model's mask as a Uint8Array, after checking that it is uint8 on the canonical grid. */
function checkedMask(tensor, shape) {
  if (tensor.type !== 'uint8' || tensor.dims.length !== 3 || tensor.dims.some((n, i) => n !== shape[i])) {
    throw new ModelError(`the model's mask is ${tensor.type} [${tensor.dims.join(', ')}], `
      + `expected uint8 [${shape.join(', ')}]`);
  }
  return tensor.data;
}

/** Run the session on the canonical image; ONNX Runtime's failures become a one-line ModelError. */
async function runModel(session, feeds) {
  try {
    return await session.run(feeds, ['mask', 'score']);
  } catch (error) {
    throw new ModelError(`the model failed on this scan: ${oneLine(error.message)}`);
  }
}

/**
 * Segment a scan parsed by parseNifti with an ONNX Runtime module (ort) and an open session.
 * Returns {mask (Uint8Array in the scan's own voxel order, column-major), volumeMl, score, seconds}.
 */
export async function segment(ort, session, scan) {
  const started = performance.now();
  checkInterface(session);
  const mapping = canonicalMapping(scan.affine, scan.dims);
  const feeds = {
    image: new ort.Tensor('float32', toCanonical(scan.voxels, mapping), mapping.shape),
    spacing: new ort.Tensor('float32', Float32Array.from(mapping.spacing), [3]),
  };
  const outputs = await runModel(session, feeds);
  const mask = fromCanonical(checkedMask(outputs.mask, mapping.shape), mapping);
  let count = 0;
  for (let i = 0; i < mask.length; i += 1) if (mask[i] !== 0) count += 1;
  const volumeMl = (count * Math.abs(determinant3(scan.affine))) / 1000;
  const score = Number(outputs.score.data[0]);
  return { mask, volumeMl, score, seconds: (performance.now() - started) / 1000 };
}
