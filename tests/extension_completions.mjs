// Loads a pi extension with pi's own loader (pi-coding-agent's discoverAndLoadExtensions, as `pi -e`
// and `pi install` do) and prints, as JSON, its path, its flags and its /proxy argument completions.
// Usage: node extension_completions.mjs EXTENSION EMPTY_DIR PREFIX...
import { discoverAndLoadExtensions } from "@mariozechner/pi-coding-agent";

const [extension, emptyDir, ...prefixes] = process.argv.slice(2);
const { extensions, errors } = await discoverAndLoadExtensions([extension], emptyDir, emptyDir);
if (errors.length) {
	console.error(JSON.stringify(errors));
	process.exit(1);
}
const [loaded] = extensions;
const command = loaded.commands.get("proxy");
const completions = {};
for (const prefix of prefixes) completions[prefix] = await command.getArgumentCompletions(prefix);
console.log(JSON.stringify({ paths: extensions.map((e) => e.path), flags: [...loaded.flags.keys()], completions }));
