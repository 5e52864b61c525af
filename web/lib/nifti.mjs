// NIfTI-1 and NIfTI-2 (.nii, .nii.gz) in memory: parse a scan, write a uint8 mask on its grid.
// No file-system access here, so that a browser page can use it as it is.
import * as niftiReader from 'nifti-reader-js';
import { gunzipSync, gzipSync } from 'fflate';

/** A scan or file that cannot be used as given (reported as one line, exit code 2). */
export class InputError extends Error {
  constructor(message) {
    super(message);
    this.name = 'InputError';
  }
}

// Voxel types heartseg reads, by NIfTI datatype code.
const VOXEL_TYPES = {
  2: { name: 'uint8', array: Uint8Array },
  4: { name: 'int16', array: Int16Array },
  8: { name: 'int32', array: Int32Array },
  16: { name: 'float32', array: Float32Array },
  64: { name: 'float64', array: Float64Array },
  256: { name: 'int8', array: Int8Array },
  512: { name: 'uint16', array: Uint16Array },
  768: { name: 'uint32', array: Uint32Array },
  1024: { name: 'int64', array: BigInt64Array },
  1280: { name: 'uint64', array: BigUint64Array },
};
const UNSUPPORTED_TYPES = {
  1: 'binary (1 bit)', 32: 'complex64', 128: 'RGB24', 1536: 'float128', 1792: 'complex128',
  2048: 'complex256', 2304: 'RGBA32',
};
// The transform codes nibabel accepts; it reads any other code as 0 (unknown).
const XFORM_CODES = new Set([0, 1, 2, 3, 4, 5]);
const LAYOUT = {
  1: { dataStart: 352, srowOffset: 280, srowBytes: 4 },
  2: { dataStart: 544, srowOffset: 400, srowBytes: 8 },
};
const LITTLE_ENDIAN_HOST = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** The bytes of an ArrayBuffer, Uint8Array or Node Buffer as a Uint8Array view. */
function asBytes(data) {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  throw new TypeError('expected an ArrayBuffer or Uint8Array');
}

/** The file's bytes, gunzipped when they are gzip. */
function uncompressed(bytes) {
  if (bytes.length < 2 || bytes[0] !== 0x1f || bytes[1] !== 0x8b) return bytes;
  try {
    return gunzipSync(bytes);
  } catch (error) {
    throw new InputError(`not a readable gzip file (${error.message})`);
  }
}

/** An ArrayBuffer holding exactly these bytes (nifti-reader-js reads whole buffers). */
function ownBuffer(bytes) {
  if (bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength) return bytes.buffer;
  return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
}

/** The header as nifti-reader-js reads it, with its NIfTI version (1 or 2). */
function readHeader(buffer) {
  const version = niftiReader.isNIFTI1(buffer) ? 1 : niftiReader.isNIFTI2(buffer) ? 2 : 0;
  if (version === 0) throw new InputError('not a NIfTI-1/2 file (no n+1 or n+2 magic)');
  try {
    return { header: niftiReader.readHeader(buffer), version };
  } catch (error) {
    throw new InputError(`not a readable NIfTI-${version} header (${error.message})`);
  }
}

/** The scan's shape [X, Y, Z]; throws for anything but one 3-D volume. */
function spatialDims(header) {
  const ndim = header.dims[0];
  if (!(ndim >= 1 && ndim <= 7)) throw new InputError(`invalid NIfTI header: dim[0] is ${ndim}, not 1 to 7`);
  const shape = header.dims.slice(1, ndim + 1);
  if (shape.some((n) => !(Number.isSafeInteger(n) && n > 0))) {
    throw new InputError(`invalid NIfTI header: dimensions ${shape.join(' x ')} must be positive`);
  }
  if (ndim === 4 && shape[3] > 1) throw new InputError(`4-D image with ${shape[3]} volumes; give one 3-D volume`);
  const spatial = ndim === 4 ? shape.slice(0, 3) : shape;
  if (spatial.length !== 3) throw new InputError(`expected a 3-D image, got ${ndim}-D with shape ${shape.join(' x ')}`);
  if (Math.min(...spatial) < 2) {
    throw new InputError(`expected a 3-D image, got shape ${spatial.join(' x ')} (a 2-D slice?)`);
  }
  return spatial;
}

/** The voxel type of the header's datatype code; throws for types heartseg does not read. */
function voxelType(header) {
  const code = header.datatypeCode;
  const type = VOXEL_TYPES[code];
  if (type) return type;
  const name = UNSUPPORTED_TYPES[code] ?? 'unknown';
  throw new InputError(`unsupported data type ${name} (NIfTI datatype code ${code})`);
}

/** pixdim[1..3], which must be positive and finite (nibabel would silently "fix" them otherwise). */
function voxelSizes(header) {
  const sizes = header.pixDims.slice(1, 4);
  if (sizes.some((v) => !(Number.isFinite(v) && v > 0))) {
    const shown = sizes.map((v) => +v.toFixed(6)).join(', ');
    throw new InputError(`voxel spacing in the header must be positive, got ${shown}`);
  }
  return sizes;
}

/** The transform codes as nibabel reads them (invalid codes become 0). */
function xformCodes(header) {
  const valid = (code) => (XFORM_CODES.has(code) ? code : 0);
  return { sform: valid(header.sform_code), qform: valid(header.qform_code) };
}

/** srow_x, srow_y, srow_z as stored (nifti-reader-js drops them when it prefers the qform). */
function storedSrow(view, version, littleEndian) {
  const { srowOffset, srowBytes } = LAYOUT[version];
  return [0, 1, 2].map((row) => [0, 1, 2, 3].map((col) => {
    const at = srowOffset + (row * 4 + col) * srowBytes;
    return srowBytes === 4 ? view.getFloat32(at, littleEndian) : view.getFloat64(at, littleEndian);
  }));
}

/** The qform affine as nibabel computes it (quaternion with w >= 0, qfac -1 only when pixdim[0] is -1). */
function qformAffine(header, sizes) {
  const [b, c, d] = [header.quatern_b, header.quatern_c, header.quatern_d];
  const w2 = 1 - (b * b + c * c + d * d);
  if (w2 < -1e-6) throw new InputError('invalid NIfTI header: the qform quaternion is not a unit quaternion');
  const a = Math.sqrt(Math.max(w2, 0));
  const rotation = [
    [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
    [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
    [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - b * b - c * c]];
  const qfac = header.pixDims[0] === -1 ? -1 : 1;
  const zooms = [sizes[0], sizes[1], sizes[2] * qfac];
  const offsets = [header.qoffset_x, header.qoffset_y, header.qoffset_z];
  return [0, 1, 2].map((r) => [...zooms.map((z, col) => rotation[r][col] * z), offsets[r]]).concat([[0, 0, 0, 1]]);
}

/** nibabel's affine when neither transform is set: voxel sizes about the grid's centre, x flipped. */
function baseAffine(dims, sizes) {
  const zooms = [-sizes[0], sizes[1], sizes[2]];
  return [0, 1, 2].map((r) => [0, 1, 2].map((col) => (r === col ? zooms[r] : 0))
    .concat([-((dims[r] - 1) / 2) * zooms[r]])).concat([[0, 0, 0, 1]]);
}

/** nibabel's choice of affine: the sform when its code is set, else the qform when its code is set, else the base. */
function bestAffine(header, srow, dims, sizes) {
  const codes = xformCodes(header);
  const affine = codes.sform !== 0 ? [...srow, [0, 0, 0, 1]]
    : codes.qform !== 0 ? qformAffine(header, sizes) : baseAffine(dims, sizes);
  if (affine.flat().some((v) => !Number.isFinite(v)) || Math.abs(determinant3(affine)) < 1e-12) {
    throw new InputError("the header's affine is singular or not finite");
  }
  return affine;
}

/** The determinant of a 4x4 affine's 3x3 part. */
export function determinant3(m) {
  return m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
    - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
    + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
}

/** The stored voxels in the host's byte order, in their own typed array. */
function rawVoxels(bytes, header, version, type, count) {
  const start = Math.max(Number(header.vox_offset), LAYOUT[version].dataStart);
  const size = count * type.array.BYTES_PER_ELEMENT;
  if (bytes.length < start + size) {
    throw new InputError(`truncated: the header describes ${start + size} bytes of offset and voxel data, `
      + `the file has ${bytes.length}`);
  }
  const copy = bytes.slice(start, start + size);
  if (header.littleEndian !== LITTLE_ENDIAN_HOST) {
    const width = type.array.BYTES_PER_ELEMENT;
    for (let at = 0; at < size; at += width) copy.subarray(at, at + width).reverse();
  }
  return new type.array(copy.buffer, 0, count);
}

/** nibabel's slope and intercept: none (1, 0) when the slope is 0 or not finite. */
function scaling(header) {
  const slope = header.scl_slope;
  const inter = header.scl_inter;
  if (slope === 0 || !Number.isFinite(slope)) return { slope: 1, inter: 0 };
  if (!Number.isFinite(inter)) throw new InputError(`invalid NIfTI header: valid scl_slope but scl_inter is ${inter}`);
  return { slope, inter };
}

/** The voxels as float32, scaled as nibabel's get_fdata does (in double precision, rounded once). */
function scaledVoxels(raw, { slope, inter }) {
  const out = new Float32Array(raw.length);
  const big = raw instanceof BigInt64Array || raw instanceof BigUint64Array;
  let finite = true;
  for (let i = 0; i < raw.length; i += 1) {
    const value = (big ? Number(raw[i]) : raw[i]) * slope + inter;
    out[i] = value;
    if (!Number.isFinite(out[i])) finite = false;
  }
  if (!finite) {
    throw new InputError('the image contains NaN or infinite voxels (or values beyond the float32 range)');
  }
  return out;
}

/**
 * Parse a NIfTI-1 or NIfTI-2 file (.nii or .nii.gz bytes).
 * Returns {header (nifti-reader-js's), version (1 or 2), affine (4x4, nibabel's choice), dims [X, Y, Z],
 * srow (the stored sform rows, 3x4), voxels (Float32Array, column-major: x fastest, scl_slope/scl_inter applied)}.
 * Throws InputError with a one-line message for unusable input.
 */
export function parseNifti(data) {
  const bytes = uncompressed(asBytes(data));
  const buffer = ownBuffer(bytes);
  const { header, version } = readHeader(buffer);
  const dims = spatialDims(header);
  const type = voxelType(header);
  const sizes = voxelSizes(header);
  const srow = storedSrow(new DataView(buffer), version, header.littleEndian);
  const affine = bestAffine(header, srow, dims, sizes);
  const raw = rawVoxels(new Uint8Array(buffer), header, version, type, dims[0] * dims[1] * dims[2]);
  return { header, version, affine, dims, srow, voxels: scaledVoxels(raw, scaling(header)) };
}

/**
 * The checks parseNifti makes before it reads any voxel, on a file's first bytes (uncompressed, at least the
 * header): a page can refuse a scan from its header before it decompresses the whole file.
 * Returns {header (nifti-reader-js's), version (1 or 2), dims [X, Y, Z], type (the voxel type's name)}.
 */
export function checkNiftiHeader(data) {
  const buffer = ownBuffer(asBytes(data));
  const { header, version } = readHeader(buffer);
  const dims = spatialDims(header);
  const type = voxelType(header);
  const sizes = voxelSizes(header);
  bestAffine(header, storedSrow(new DataView(buffer), version, header.littleEndian), dims, sizes);
  return { header, version, dims, type: type.name };
}

/** Write a NIfTI-1 header for a uint8 volume that keeps the scan's dims, pixdim, qform and sform. */
function maskHeader(scan) {
  const { header, dims } = scan;
  if (dims.some((n) => n > 32767)) throw new InputError(`dimensions ${dims.join(' x ')} do not fit a NIfTI-1 header`);
  const out = new DataView(new ArrayBuffer(LAYOUT[1].dataStart));
  const le = true;
  out.setInt32(0, 348, le);
  [3, ...dims, 1, 1, 1, 1].forEach((n, i) => out.setInt16(40 + 2 * i, n, le));
  out.setInt16(70, 2, le); // datatype uint8
  out.setInt16(72, 8, le); // bitpix
  header.pixDims.slice(0, 8).forEach((v, i) => out.setFloat32(76 + 4 * i, v, le));
  out.setFloat32(108, LAYOUT[1].dataStart, le);
  out.setFloat32(112, 1, le); // scl_slope
  out.setFloat32(116, 0, le); // scl_inter
  out.setUint8(123, header.xyzt_units & 0xff);
  out.setFloat32(124, 1, le); // cal_max
  'heartseg mask'.split('').forEach((ch, i) => out.setUint8(148 + i, ch.charCodeAt(0)));
  const codes = xformCodes(header);
  out.setInt16(252, codes.qform, le);
  out.setInt16(254, codes.sform, le);
  [header.quatern_b, header.quatern_c, header.quatern_d, header.qoffset_x, header.qoffset_y, header.qoffset_z]
    .forEach((v, i) => out.setFloat32(256 + 4 * i, v, le));
  scan.srow.flat().forEach((v, i) => out.setFloat32(280 + 4 * i, v, le));
  [0x6e, 0x2b, 0x31, 0].forEach((byte, i) => out.setUint8(344 + i, byte));
  return new Uint8Array(out.buffer);
}

/**
 * The bytes of a uint8 mask NIfTI-1 file on the scan's grid (gzip when gzip is true).
 * mask: Uint8Array in the scan's voxel order (column-major, as parseNifti gives voxels).
 */
export function maskFileBytes(scan, mask, { gzip = false } = {}) {
  const count = scan.dims[0] * scan.dims[1] * scan.dims[2];
  if (!(mask instanceof Uint8Array) || mask.length !== count) {
    throw new TypeError(`mask must be a Uint8Array of ${count} voxels`);
  }
  const head = maskHeader(scan);
  const file = new Uint8Array(head.length + count);
  file.set(head, 0);
  file.set(mask, head.length);
  return gzip ? gzipSync(file, { level: 6 }) : file;
}
