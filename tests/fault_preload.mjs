// fault_preload.mjs: preloaded (`node --import`) into every bridge that tests/test_faults.py's
// faulty `node` starts. It makes the bridge misbehave on its stdout, as the mode file named by
// FAULT_MODE_FILE says when the bridge writes (so an idle pooled bridge obeys the mode of the
// moment its request is answered):
//   garbage-at-start  the first write is a line that is not JSON
//   garbage-mid       the write after the first text delta is a line that is not JSON
//   exit-mid          the process exits (status 1) instead of the write after the first text delta
// Anything else: the bridge is left alone. (The mode `crash-at-start` is the wrapper script's.)
import { readFileSync } from "node:fs";

const mode = () => {
  try {
    return readFileSync(process.env.FAULT_MODE_FILE, "utf8").trim();
  } catch {
    return "";
  }
};

const write = process.stdout.write.bind(process.stdout);
let sawText = false;
let writes = 0;

process.stdout.write = (chunk, ...rest) => {
  const text = String(chunk);
  if (!text) return write(chunk, ...rest);
  const now = mode();
  writes += 1;
  if (now === "garbage-at-start" && writes === 1) return write("this is not JSON\n", ...rest);
  if (sawText && now === "garbage-mid") return write("<html>not JSON either</html>\n", ...rest);
  if (sawText && now === "exit-mid") {
    process.stderr.write("fault_preload: exiting mid-stream on purpose\n");
    process.exit(1);
  }
  if (text.includes('"text_delta"')) sawText = true;
  return write(chunk, ...rest);
};
