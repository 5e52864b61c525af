// What the page refuses before it decompresses a whole scan: anything but one 3-D NIfTI volume, and scans too large
// for a browser tab's memory.
import { Gunzip } from 'fflate';
import { checkNiftiHeader, InputError } from '../lib/nifti.mjs';

// The scan's copies in the page (bytes, float32 voxels, the canonical array) and the model's input and outputs in
// WebAssembly's memory (which stops at 4 GiB) take tens of bytes a voxel: at most 2^26 voxels, a 512 x 512 x 256 scan,
// which segments in about 9 s on two cores.
export const MAX_VOXELS = 2 ** 26;
export const LIMIT_TEXT = '67 million voxels (512 x 512 x 256)';
// A file larger than the largest scan the page takes (float64 voxels) plus room for header extensions.
export const MAX_FILE_BYTES = MAX_VOXELS * 8 + 2 ** 20;
const HEADER_BYTES = 544; // a NIfTI-2 header; NIfTI-1's is 348
const CHUNK_BYTES = 4096;

/** A file's first count bytes, gunzipped when it is gzip; null when they cannot be had (parseNifti then says why). */
function leadingBytes(bytes, count) {
  if (bytes.length < 2 || bytes[0] !== 0x1f || bytes[1] !== 0x8b) return bytes.subarray(0, count);
  const parts = [];
  let have = 0;
  const gunzip = new Gunzip((chunk) => {
    parts.push(chunk);
    have += chunk.length;
  });
  try {
    for (let at = 0; at < bytes.length && have < count; at += CHUNK_BYTES) {
      gunzip.push(bytes.subarray(at, at + CHUNK_BYTES), at + CHUNK_BYTES >= bytes.length);
    }
  } catch {
    return null;
  }
  const head = new Uint8Array(Math.min(have, count));
  let at = 0;
  for (const part of parts) {
    if (at >= head.length) break;
    head.set(part.subarray(0, head.length - at), at);
    at += Math.min(part.length, head.length - at);
  }
  return head;
}

/** InputError when a file is too large to read at all. */
export function checkFileSize(bytes) {
  if (bytes > MAX_FILE_BYTES) {
    throw new InputError(`the file is ${(bytes / 2 ** 20).toFixed(0)} MiB; this page takes scans of at most `
      + `${LIMIT_TEXT}, what a browser tab's memory allows (use heartseg-infer for larger scans)`);
  }
}

/** InputError when the file's header is not one usable 3-D volume or describes too many voxels for the tab. */
export function checkScan(bytes) {
  checkFileSize(bytes.length);
  const head = leadingBytes(bytes, HEADER_BYTES);
  if (head === null) return;
  let dims;
  try {
    ({ dims } = checkNiftiHeader(head));
  } catch (error) {
    if (error instanceof InputError) throw error;
    return; // a header cut short: parseNifti reports the file as it is
  }
  const voxels = dims[0] * dims[1] * dims[2];
  if (voxels > MAX_VOXELS) {
    throw new InputError(`the scan has ${(voxels / 1e6).toFixed(0)} million voxels (${dims.join(' x ')}); this page `
      + `segments scans of at most ${LIMIT_TEXT}, what a browser tab's memory allows (use heartseg-infer for `
      + 'larger scans)');
  }
}
