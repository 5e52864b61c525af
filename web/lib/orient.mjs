// The closest-canonical (RAS+) reorientation nibabel does (nib.as_closest_canonical), and its inverse.
// Scans hold column-major voxels (x fastest, as NIfTI stores them); the canonical array is in C order
// [X, Y, Z] (z fastest, index x*Y*Z + y*Z + z), the layout ONNX Runtime takes.

/** The 3x3 part of a 4x4 affine, each column divided by its norm (a zero column is left as it is). */
function unitColumns(affine) {
  const norms = [0, 1, 2].map((col) => Math.hypot(affine[0][col], affine[1][col], affine[2][col]) || 1);
  return [0, 1, 2].map((row) => [0, 1, 2].map((col) => affine[row][col] / norms[col]));
}

/** The inverse transpose of a 3x3 matrix (its cofactors over the determinant). */
function inverseTranspose(m) {
  const cof = (r, c) => {
    const rows = [0, 1, 2].filter((i) => i !== r);
    const cols = [0, 1, 2].filter((j) => j !== c);
    const minor = m[rows[0]][cols[0]] * m[rows[1]][cols[1]] - m[rows[0]][cols[1]] * m[rows[1]][cols[0]];
    return (r + c) % 2 === 0 ? minor : -minor;
  };
  const cofactors = [0, 1, 2].map((r) => [0, 1, 2].map((c) => cof(r, c)));
  const det = m[0][0] * cofactors[0][0] + m[0][1] * cofactors[0][1] + m[0][2] * cofactors[0][2];
  if (Math.abs(det) < 1e-12) throw new Error('the affine is singular: its axes have no orientation');
  return cofactors.map((row) => row.map((v) => v / det));
}

/** The orthogonal polar factor of a non-singular 3x3 matrix (what nibabel gets from its SVD), by Newton's iteration. */
function polarFactor(m) {
  let current = m;
  for (let step = 0; step < 100; step += 1) {
    const inv = inverseTranspose(current);
    const next = current.map((row, r) => row.map((v, c) => (v + inv[r][c]) / 2));
    const change = Math.max(...next.flat().map((v, k) => Math.abs(v - current.flat()[k])));
    current = next;
    if (change < 1e-15) break;
  }
  return current;
}

/**
 * nibabel.orientations.io_orientation: for each array axis, [world axis (0 R, 1 A, 2 S), +1 or -1].
 * Axes are matched strongest first (stable on ties), each world axis once.
 */
export function ioOrientation(affine) {
  const rotation = polarFactor(unitColumns(affine));
  const strength = [0, 1, 2].map((col) => Math.max(...[0, 1, 2].map((row) => rotation[row][col] ** 2)));
  const order = [0, 1, 2].sort((a, b) => strength[b] - strength[a]);
  const ornt = [null, null, null];
  for (const axis of order) {
    const column = rotation.map((row) => row[axis]);
    if (column.every((v) => Math.abs(v) <= 1e-8)) continue;
    const magnitudes = column.map(Math.abs);
    const world = magnitudes.indexOf(Math.max(...magnitudes));
    ornt[axis] = [world, column[world] < 0 ? -1 : 1];
    rotation[world] = [0, 0, 0];
  }
  if (ornt.includes(null)) throw new Error('the affine does not orient all three axes');
  return ornt;
}

/**
 * The mapping between a scan's voxels (dims [X, Y, Z], column-major) and its closest-canonical array.
 * Returns {ornt, shape (canonical [X, Y, Z]), spacing (mm per canonical axis), affine (canonical 4x4),
 * start and steps (where canonical voxel (a, b, c) sits in the scan's array: start + a*steps[0] + ...)}.
 */
export function canonicalMapping(affine, dims) {
  const ornt = ioOrientation(affine);
  const strides = [1, dims[0], dims[0] * dims[1]];
  const shape = [];
  const steps = [];
  const spacing = [];
  const canonical = [[0, 0, 0, affine[0][3]], [0, 0, 0, affine[1][3]], [0, 0, 0, affine[2][3]], [0, 0, 0, 1]];
  let start = 0;
  for (let out = 0; out < 3; out += 1) {
    const axis = ornt.findIndex(([world]) => world === out);
    const flip = ornt[axis][1] < 0;
    shape[out] = dims[axis];
    steps[out] = flip ? -strides[axis] : strides[axis];
    if (flip) start += (dims[axis] - 1) * strides[axis];
    spacing[out] = Math.hypot(affine[0][axis], affine[1][axis], affine[2][axis]);
    for (let row = 0; row < 3; row += 1) {
      canonical[row][out] = flip ? -affine[row][axis] : affine[row][axis];
      if (flip) canonical[row][3] += affine[row][axis] * (dims[axis] - 1);
    }
  }
  return { ornt, shape, spacing, affine: canonical, start, steps };
}

/** True when the scan is already in canonical order (nibabel then returns it unchanged). */
export function isCanonical(mapping) {
  return mapping.ornt.every(([world, sign], axis) => world === axis && sign === 1);
}

/** The scan's voxels (column-major) as the canonical array in C order, in an array of the same type. */
export function toCanonical(voxels, mapping) {
  const [nx, ny, nz] = mapping.shape;
  const [sx, sy, sz] = mapping.steps;
  const out = new voxels.constructor(nx * ny * nz);
  let k = 0;
  for (let x = 0; x < nx; x += 1) {
    for (let y = 0; y < ny; y += 1) {
      let at = mapping.start + x * sx + y * sy;
      for (let z = 0; z < nz; z += 1, at += sz) out[k++] = voxels[at];
    }
  }
  return out;
}

/** A canonical array in C order (a mask, say) back in the scan's own voxel order (column-major). */
export function fromCanonical(array, mapping) {
  const [nx, ny, nz] = mapping.shape;
  const [sx, sy, sz] = mapping.steps;
  const out = new array.constructor(nx * ny * nz);
  let k = 0;
  for (let x = 0; x < nx; x += 1) {
    for (let y = 0; y < ny; y += 1) {
      let at = mapping.start + x * sx + y * sy;
      for (let z = 0; z < nz; z += 1, at += sz) out[at] = array[k++];
    }
  }
  return out;
}
