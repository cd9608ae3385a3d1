import { defineConfig } from "vite";
import react from "@vitejs/plugin-react";

// `npm run dev` serves the app on :5173 and sends /api and /login to a running `aitk ui` (default :8675).
// The proxy keeps the browser's Host header, so the server sees same-origin requests (its CSRF check
// passes); sign in through http://localhost:5173/login when AI_TOOLKIT_AUTH is set.
const backend = process.env.AITK_UI_BACKEND ?? "http://localhost:8675";

export default defineConfig({
  plugins: [react()],
  build: { outDir: "dist", emptyOutDir: true, sourcemap: false, chunkSizeWarningLimit: 800 },
  server: { proxy: { "/api": { target: backend }, "/login": { target: backend } } },
});
