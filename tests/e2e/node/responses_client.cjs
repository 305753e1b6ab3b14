// Streams one Responses API call with the openai Node SDK and prints what the client saw, as JSON on stdout:
// {"events": [...every event the SDK yielded...], "final": the stream helper's finalResponse() or null,
//  "error": {"name", "message", "status"} or null}.
// Usage: OPENAI_MODULE=/abs/path/node_modules/openai node responses_client.cjs '{"baseURL", "apiKey", "model"}'
'use strict';
const OpenAI = require(process.env.OPENAI_MODULE);

async function main() {
  const { baseURL, apiKey, model } = JSON.parse(process.argv[2]);
  const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 30000 });
  const input = 'Tell me about your pets.';
  const out = { events: [], final: null, error: null, finalError: null };
  try {
    const stream = await client.responses.create({ model, input, stream: true });
    for await (const event of stream) out.events.push(event);
  } catch (e) {
    out.error = { name: e.constructor.name, message: e.message, status: e.status ?? null };
  }
  try {
    const helper = client.responses.stream({ model, input });
    for await (const _ of helper) { /* the helper accumulates the snapshot */ }
    out.final = await helper.finalResponse();
  } catch (e) {
    out.finalError = { name: e.constructor.name, message: e.message };
  }
  process.stdout.write(JSON.stringify(out));
}

main().catch((e) => { process.stderr.write(String(e && e.stack || e)); process.exit(1); });
