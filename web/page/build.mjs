#!/usr/bin/env node
// Build the heartseg web page into runtime/web_page/, the folder heartseg-web serves (and the wheel ships):
// the page's scripts bundled with esbuild, ONNX Runtime Web's WebAssembly files copied beside them.
//   npm run build            (in web/; after npm ci)
//   node page/build.mjs OUT  (another output folder)
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const WEB = path.dirname(HERE);
const OUT = path.resolve(process.argv[2] ?? path.join(WEB, '..', 'runtime', 'web_page'));
const ORT_DIST = path.join(WEB, 'node_modules', 'onnxruntime-web', 'dist');
// ONNX Runtime Web's WebAssembly build (SIMD, threads) without WebGPU: its module, its Emscripten loader and binary.
const ORT_FILES = ['ort.wasm.min.mjs', 'ort-wasm-simd-threaded.mjs', 'ort-wasm-simd-threaded.wasm'];
const STATIC_FILES = ['index.html', 'style.css'];

/** Bundle the page's two entry points; the worker loads ONNX Runtime from ort/ at run time. */
async function bundle() {
  await esbuild.build({
    entryPoints: { app: path.join(HERE, 'app.mjs'), worker: path.join(HERE, 'worker.mjs') },
    outdir: OUT,
    bundle: true,
    format: 'esm',
    target: ['es2022'],
    minify: true,
    sourcemap: false,
    legalComments: 'eof',
    external: ['./ort/*'],
    logLevel: 'warning',
  });
}

/** Copy the static files and ONNX Runtime Web's files, which must keep their names and sit side by side. */
function copyFiles() {
  for (const name of STATIC_FILES) fs.copyFileSync(path.join(HERE, name), path.join(OUT, name));
  fs.mkdirSync(path.join(OUT, 'ort'));
  for (const name of ORT_FILES) {
    const text = fs.readFileSync(path.join(ORT_DIST, name));
    // Drop the source-map comment: the maps are not shipped.
    const body = name.endsWith('.mjs')
      ? Buffer.from(text.toString('utf8').replace(/\n?\/\/# sourceMappingURL=\S+\s*$/, '\n')) : text;
    fs.writeFileSync(path.join(OUT, 'ort', name), body);
  }
}

/** Empty the output folder; refuse one that holds anything but an earlier build. */
function clearOutput() {
  if (fs.existsSync(OUT) && fs.readdirSync(OUT).length > 0 && !fs.existsSync(path.join(OUT, 'worker.js'))) {
    console.error(`error: ${OUT}: not empty and not an earlier build of the page; give an empty or new folder`);
    process.exit(2);
  }
  fs.rmSync(OUT, { recursive: true, force: true });
  fs.mkdirSync(OUT, { recursive: true });
}

clearOutput();
await bundle();
copyFiles();
const bytes = fs.readdirSync(OUT, { recursive: true })
  .map((name) => path.join(OUT, name)).filter((file) => fs.statSync(file).isFile())
  .reduce((sum, file) => sum + fs.statSync(file).size, 0);
console.log(`built ${path.relative(process.cwd(), OUT) || '.'} (${(bytes / 2 ** 20).toFixed(1)} MiB)`);
