// The official openai package as a client of tm-serve: chat and completions,
// with and without streaming, models.list, and an error read through the
// package's exception types. Usage: node openai_client.mjs URL MODEL
import OpenAI from "openai";

const [url, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL: url + "/v1", apiKey: "unused", maxRetries: 0 });
const check = (ok, what) => { if (!ok) { console.error("FAIL: " + what); process.exit(1); } console.log("ok " + what); };

const models = await client.models.list();
check(models.data.length === 1 && models.data[0].id === model, "models.list names the served model");

const chat = await client.chat.completions.create({
  model, messages: [{ role: "user", content: "Hello" }], max_tokens: 8, temperature: 0 });
check(chat.object === "chat.completion" && chat.choices[0].message.role === "assistant", "chat.completions.create");
check(typeof chat.choices[0].message.content === "string" && chat.usage.completion_tokens > 0, "chat usage");

const stream = await client.chat.completions.create({
  model, messages: [{ role: "user", content: "Hello" }], max_tokens: 8, temperature: 0, stream: true,
  stream_options: { include_usage: true } });
let text = "", usage = null, finish = null;
for await (const chunk of stream) {
  if (chunk.usage) usage = chunk.usage;
  if (chunk.choices.length) {
    text += chunk.choices[0].delta.content || "";
    finish = chunk.choices[0].finish_reason || finish;
  }
}
check(text === chat.choices[0].message.content, "streamed chat equals the non-streamed answer (greedy)");
check(usage && usage.completion_tokens === chat.usage.completion_tokens && finish, "streamed usage and finish_reason");

const comp = await client.completions.create({ model, prompt: "Once upon a time", max_tokens: 6, temperature: 0, logprobs: 2 });
check(comp.object === "text_completion" && comp.choices[0].text.length > 0, "completions.create");
check(comp.choices[0].logprobs.tokens.join("") === comp.choices[0].text, "completion logprobs tokens spell the text");

const cstream = await client.completions.create({ model, prompt: "Once upon a time", max_tokens: 6, temperature: 0, stream: true });
let ctext = "";
for await (const chunk of cstream) ctext += chunk.choices[0]?.text || "";
check(ctext === comp.choices[0].text, "streamed completion equals the non-streamed one");

try {
  await client.chat.completions.create({ model: "no-such-model", messages: [{ role: "user", content: "x" }] });
  check(false, "unknown model refused");
} catch (e) {
  check(e instanceof OpenAI.NotFoundError && e.status === 404 && e.code === "model_not_found", "unknown model -> NotFoundError");
}
try {
  await client.chat.completions.create({ model, messages: [{ role: "user", content: "x" }], max_tokens: -1 });
  check(false, "negative max_tokens refused");
} catch (e) {
  check(e instanceof OpenAI.BadRequestError && e.status === 400 && /max_tokens/.test(e.message), "max_tokens -1 -> BadRequestError");
}
