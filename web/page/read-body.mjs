// Reading a fetch response's body as it arrives, for progress: the page's scans and the worker's model.

/** All of a response's bytes; onChunk(loaded, total) after each piece (total: Content-Length, or null). */
export async function readBody(response, onChunk) {
  const total = Number(response.headers.get('Content-Length')) || null;
  const reader = response.body.getReader();
  const parts = [];
  let loaded = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    parts.push(value);
    loaded += value.length;
    onChunk(loaded, total);
  }
  const bytes = new Uint8Array(loaded);
  let at = 0;
  for (const part of parts) {
    bytes.set(part, at);
    at += part.length;
  }
  return bytes;
}
