// The chat page in headless Chromium: a question, a streamed answer, a second
// turn, a stopped generation, a screenshot. Usage: node chat_page.mjs URL SCREENSHOT
import { chromium } from "playwright-core";

const [url, shot] = process.argv.slice(2);
const check = (ok, what) => { if (!ok) { console.error("FAIL: " + what); process.exit(1); } console.log("ok " + what); };
const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: ["--no-sandbox", "--disable-gpu"] });
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 760 } });
  await page.goto(url);
  await page.waitForFunction(() => !document.getElementById("model").textContent.includes("connecting"));
  await page.fill("#max_tokens", "24");
  await page.fill("#input", "What is the capital of France?");
  await page.press("#input", "Enter");
  const stats = page.locator(".msg.assistant .stats");
  await stats.first().waitFor({ timeout: 30000 });
  const first = await page.locator(".msg.assistant .body").first().textContent();
  check(first.length > 0, "a streamed answer appears: " + JSON.stringify(first.slice(0, 40)));
  check(/tokens/.test(await stats.first().textContent()), "the answer shows its token count");

  await page.fill("#input", "And of Italy?");
  await page.click("#send");
  await stats.nth(1).waitFor({ timeout: 30000 });
  check(await page.locator(".msg.user").count() === 2 && await page.locator(".msg.assistant").count() === 2, "second turn");

  // A long answer, stopped while it streams.
  await page.fill("#max_tokens", "4000");
  await page.fill("#input", "Tell me a long story.");
  await page.click("#send");
  await page.waitForFunction(() => {
    const b = document.querySelectorAll(".msg.assistant .body");
    return b.length === 3 && b[2].textContent.length > 20;
  }, null, { timeout: 30000 });
  await page.click("#stop");
  await stats.nth(2).waitFor({ timeout: 10000 });
  check((await stats.nth(2).textContent()).startsWith("stopped"), "the stop button ends the generation");
  check(!(await page.isDisabled("#send")), "ready for the next turn");
  await page.screenshot({ path: shot, fullPage: true });
  console.log("ok screenshot " + shot);
} finally {
  await browser.close();
}
