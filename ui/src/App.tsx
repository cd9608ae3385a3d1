import { useEffect, useState, type ReactNode } from "react";
import { api } from "./lib/api";
import { Link, match, useLocation } from "./lib/router";
import { Dashboard } from "./pages/Dashboard";
import { Jobs } from "./pages/Jobs";
import { JobEditor } from "./pages/JobEditor";
import { JobDetail } from "./pages/JobDetail";
import { Datasets } from "./pages/Datasets";
import { DatasetPage } from "./pages/DatasetPage";
import { QuickTrain } from "./pages/QuickTrain";
import { SettingsPage } from "./pages/Settings";

const NAV = [
  { to: "/", label: "Dashboard" },
  { to: "/jobs", label: "Jobs" },
  { to: "/jobs/new", label: "New job" },
  { to: "/quick-train", label: "Quick train" },
  { to: "/datasets", label: "Datasets" },
  { to: "/settings", label: "Settings" },
];

function page(path: string): ReactNode {
  if (path === "/" || path === "/dashboard") return <Dashboard />;
  if (path === "/jobs") return <Jobs />;
  if (path === "/jobs/new") return <JobEditor />;
  let m = match("/jobs/:id/edit", path);
  if (m) return <JobEditor jobId={Number(m.id)} key={`edit${m.id}`} />;
  m = match("/jobs/:id", path);
  if (m) return <JobDetail jobId={Number(m.id)} key={`job${m.id}`} />;
  if (path === "/datasets") return <Datasets />;
  m = match("/datasets/:name", path);
  if (m) return <DatasetPage name={m.name as string} key={`ds${m.name}`} />;
  if (path === "/quick-train") return <QuickTrain />;
  if (path === "/settings") return <SettingsPage />;
  return (
    <div className="page">
      <h1>Not found</h1>
      <p>No page at <code>{path}</code>. <Link to="/">Go to the dashboard.</Link></p>
    </div>
  );
}

function active(to: string, path: string): boolean {
  if (to === "/") return path === "/" || path === "/dashboard";
  if (to === "/jobs") return path === "/jobs" || (/^\/jobs\/\d+/.test(path));
  return path === to || path.startsWith(`${to}/`);
}

export function App() {
  const { path } = useLocation();
  const [authRequired, setAuthRequired] = useState(false);

  useEffect(() => {
    api.get<{ auth_required: boolean }>("/api/auth/check").then((r) => setAuthRequired(r.auth_required)).catch(() => undefined);
  }, []);

  const signOut = async () => {
    await api.post("/api/auth/logout").catch(() => undefined);
    window.location.assign("/login");
  };

  return (
    <div className="shell">
      <aside className="sidebar">
        <div className="sidebar-inner">
        <div className="brand">AI Toolkit</div>
        <nav>
          {NAV.map((item) => (
            <Link key={item.to} to={item.to} className={active(item.to, path) ? "nav-link nav-active" : "nav-link"}>
              {item.label}
            </Link>
          ))}
        </nav>
        {authRequired ? (
          <button type="button" className="btn btn-quiet signout" onClick={signOut}>Sign out</button>
        ) : null}
        </div>
      </aside>
      <main className="content">{page(path)}</main>
    </div>
  );
}
