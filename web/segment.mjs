#!/usr/bin/env node
// heartseg in Node.js: segment the left atrium of a NIfTI scan with the end-to-end ONNX model.
//   node web/segment.mjs IN.nii[.gz] OUT.nii[.gz] [--model PATH] [--overwrite]
// Exit codes: 0 done; 2 bad input, output or model (one 'error: ...' line); 1 an unexpected failure.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as ort from 'onnxruntime-node';
import { InputError, maskFileBytes, parseNifti } from './lib/nifti.mjs';
import { checkInterface, ModelError, oneLine, segment } from './lib/segment.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const DEFAULT_MODEL = path.join(HERE, '..', 'models', 'heartseg-la.onnx');
const USAGE = 'usage: node web/segment.mjs IN.nii[.gz] OUT.nii[.gz] [--model PATH] [--overwrite]';
const NIFTI_NAME = /\.nii(\.gz)?$/i;

/** The command line as {input, output, model, overwrite}; InputError on anything else. */
function parseArgs(argv) {
  const options = { model: DEFAULT_MODEL, overwrite: false };
  const positional = [];
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    if (arg === '--model') {
      if (i + 1 >= argv.length) throw new InputError(`--model needs a path; ${USAGE}`);
      options.model = argv[(i += 1)];
    } else if (arg.startsWith('--model=')) {
      options.model = arg.slice('--model='.length);
    } else if (arg === '--overwrite') {
      options.overwrite = true;
    } else if (arg.startsWith('-') && arg !== '-') {
      throw new InputError(`unknown option ${arg}; ${USAGE}`);
    } else {
      positional.push(arg);
    }
  }
  if (positional.length !== 2) throw new InputError(`expected IN and OUT; ${USAGE}`);
  return { input: positional[0], output: positional[1], ...options };
}

/** The input file's bytes, after the checks that give a clearer message than a failed read. */
function readInput(file) {
  if (!NIFTI_NAME.test(file)) throw new InputError(`${file}: not a NIfTI file (expected .nii or .nii.gz)`);
  let stat;
  try {
    stat = fs.statSync(file);
  } catch {
    throw new InputError(`${file}: no such file`);
  }
  if (stat.isDirectory()) throw new InputError(`${file}: is a folder, not a NIfTI file`);
  if (!stat.isFile()) throw new InputError(`${file}: not a regular file`);
  try {
    return fs.readFileSync(file);
  } catch (error) {
    throw new InputError(`${file}: cannot read it (${error.code ?? oneLine(error.message)})`);
  }
}

/** Refuse an output that could not be written or would replace a file unasked, before any work is done. */
function checkOutput({ input, output, overwrite }) {
  if (!NIFTI_NAME.test(output)) throw new InputError(`${output}: the output must be named .nii or .nii.gz`);
  const folder = path.dirname(path.resolve(output));
  if (!fs.existsSync(folder) || !fs.statSync(folder).isDirectory()) {
    throw new InputError(`${path.dirname(output)}: output folder does not exist`);
  }
  if (path.resolve(output) === path.resolve(input)) {
    throw new InputError(`${output}: the output would replace the input scan`);
  }
  if (fs.existsSync(output) && !overwrite) throw new InputError(`${output}: exists (use --overwrite to replace it)`);
}

/** An open session of the end-to-end model file; ModelError when it is missing, unreadable or another model. */
async function openModel(file) {
  if (!fs.existsSync(file) || !fs.statSync(file).isFile()) throw new ModelError(`model ${file}: no such file`);
  let session;
  try {
    session = await ort.InferenceSession.create(file, { logSeverityLevel: 3 });
  } catch (error) {
    throw new ModelError(`model ${file}: not a readable ONNX model (${oneLine(error.message)})`);
  }
  try {
    checkInterface(session);
  } catch (error) {
    throw new ModelError(`model ${file}: ${error.message}`);
  }
  return session;
}

/** Write bytes to file through a temporary file in the same folder and a rename: never a partial file. */
function writeAtomic(file, bytes) {
  const folder = path.dirname(file);
  const tmp = path.join(folder, `.${path.basename(file)}.${process.pid}.${Date.now().toString(36)}.tmp`);
  try {
    fs.writeFileSync(tmp, bytes, { flag: 'wx' });
    fs.renameSync(tmp, file);
  } catch (error) {
    fs.rmSync(tmp, { force: true });
    throw new Error(`${file}: cannot write it (${error.code ?? oneLine(error.message)})`);
  }
}

/** Segment one scan and write its mask; prints volume, score and seconds. */
async function main(argv) {
  if (argv.includes('--help') || argv.includes('-h')) {
    console.log(USAGE);
    return;
  }
  const args = parseArgs(argv);
  checkOutput(args);
  const bytes = readInput(args.input);
  let scan;
  try {
    scan = parseNifti(bytes);
  } catch (error) {
    if (error instanceof InputError) throw new InputError(`${args.input}: ${error.message}`);
    throw error;
  }
  const session = await openModel(args.model);
  const started = performance.now();
  const result = await segment(ort, session, scan);
  writeAtomic(args.output, maskFileBytes(scan, result.mask, { gzip: /\.gz$/i.test(args.output) }));
  console.log(`wrote ${args.output}`);
  console.log(`volume: ${result.volumeMl.toFixed(2)} mL`);
  console.log(`score: ${result.score.toFixed(4)}`);
  const total = (performance.now() - started) / 1000;
  console.log(`seconds: ${result.seconds.toFixed(3)} (segmentation; ${total.toFixed(3)} with writing)`);
}

main(process.argv.slice(2)).catch((error) => {
  const known = error instanceof InputError || error instanceof ModelError;
  console.error(`error: ${oneLine(error.message)}`);
  process.exitCode = known ? 2 : 1;
});
