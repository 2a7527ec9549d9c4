import ArgumentParser
import Daemon
import Foundation
import Pipeline
import Queue

public struct ExportCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Export a succeeded job's labels as a class-folder tree (torchvision ImageFolder), Label Studio tasks, or a FiftyOne dataset.",
        discussion: "See docs/exports.md. Unreadable images are left out (nolad labels lists them).")

    public enum Format: String, ExpressibleByArgument, CaseIterable {
        case imagefolder, labelstudio, fiftyone
    }

    @OptionGroup public var options: GlobalOptions

    @Argument(help: "The job id.")
    public var job: Int64

    @Option(name: .long, help: "imagefolder, labelstudio or fiftyone.")
    public var format: Format

    @Option(name: .shortAndLong, help: "The folder to create (imagefolder, fiftyone) or the tasks file (labelstudio; its labeling config goes next to it as NAME.label_config.xml). Default: nola-job-JOB-FORMAT[.json] in the current folder.")
    public var output: String?

    @Option(name: .long, help: "How images enter a folder export: symlink (default), hardlink or copy.")
    public var link: String = "symlink"

    @Option(name: .long, help: "labelstudio: prefix of each image URL, followed by the percent-encoded path relative to the collection (e.g. '/data/local-files/?d=photos/'). Default: the absolute file path.")
    public var urlPrefix: String?

    @Flag(name: .long, help: "Replace an existing output: a file, or a folder that an earlier nolad export wrote.")
    public var force = false

    public init() {}

    public func run() throws {
        do {
            guard let link = Export.Link(rawValue: link) else {
                throw NoladError(.usage, "--link must be symlink, hardlink or copy, not \"\(link)\"")
            }
            if urlPrefix != nil && format != .labelstudio {
                throw NoladError(.usage, "--url-prefix applies to --format labelstudio only")
            }
            let config = try options.load()
            let c = try options.connect(config)
            let jobs = try c.query("SELECT state::text AS state, collection, classes FROM nola.jobs WHERE id = $1", [job])
            guard let row = jobs.rows.first else { throw NoladError(.usage, "no job \(job)") }
            let state = try row.string("state")
            guard state == "succeeded" else {
                let now = ["queued": "is still queued", "running": "is still running", "failed": "failed",
                           "cancelled": "was cancelled"][state] ?? "is \(state)"
                throw NoladError(.usage, "job \(job) \(now); only a succeeded job can be exported")
            }
            let collection = try row.string("collection")
            let images = try Self.images(c, job: job)
            let classes = Export.classes(job: try row.stringArray("classes"), images: images)
            let labelled = images.filter { $0.label != nil }
            let leftOut = images.count - labelled.count
            let destination = absolute(output ?? "nola-job-\(job)-\(format.rawValue)" + (format == .labelstudio ? ".json" : ""))
            let note = leftOut == 0 ? "" : "; \(leftOut) unreadable image\(leftOut == 1 ? " was" : "s were") left out (nolad labels \(job) lists them)"
            switch format {
            case .imagefolder, .fiftyone:
                let plan = format == .imagefolder ? Export.imageFolderPlan(classes: classes, images: images)
                                                  : Export.fiftyOnePlan(images: images)
                try checkSources(collection: collection, plan.map(\.image))
                try refuseInside(collection: collection, destination)
                try ExportWriter.writeFolder(at: destination, force: force, marker: markerJSON(link: link)) { temp in
                    for (image, relative) in plan {
                        try ExportWriter.place(source: Array(collection.utf8) + [UInt8(ascii: "/")] + image.rawPath,
                                               at: temp + "/" + relative, link: link, display: collection + "/" + image.path)
                    }
                    if format == .fiftyone {
                        try ExportWriter.writeFile(temp + "/labels.json", Export.fiftyOneLabels(classes: classes, plan: plan).prettyJSONText)
                    }
                }
                let folders = Set(plan.map { $0.destination.split(separator: "/").first! }).count
                print(format == .imagefolder
                      ? "wrote \(plan.count) image\(plan.count == 1 ? "" : "s") (\(link.rawValue)) in \(folders) class folder\(folders == 1 ? "" : "s") to \(destination)\(note)"
                      : "wrote a FiftyOne image classification dataset of \(plan.count) image\(plan.count == 1 ? "" : "s") (\(link.rawValue)) to \(destination)\(note)")
            case .labelstudio:
                try checkSources(collection: collection, labelled)
                let tasks = Export.labelStudioTasks(jobID: job, collection: collection, images: images, urlPrefix: urlPrefix)
                let configPath = (destination.hasSuffix(".json") ? String(destination.dropLast(5)) : destination) + ".label_config.xml"
                try ExportWriter.writeFiles([(destination, tasks.prettyJSONText), (configPath, Export.labelStudioConfig(classes: classes))], force: force)
                print("wrote \(labelled.count) Label Studio task\(labelled.count == 1 ? "" : "s") to \(destination) and their labeling config to \(configPath)\(note)")
            }
        } catch let e as ExitCode {
            throw e
        } catch {
            throw fail("\(error)")
        }
    }

    private func absolute(_ path: String) -> String {
        URL(fileURLWithPath: path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path).standardizedFileURL.path
    }

    private func markerJSON(link: Export.Link) -> String {
        JSONValue.object(["job": .number(Double(job)), "format": .string(format.rawValue), "link": .string(link.rawValue),
                          "written_at": .string(ISO8601DateFormatter().string(from: Date()))]).prettyJSONText
    }

    /// The job's images with their labels, in path order.
    static func images(_ c: PostgresConnection, job: Int64) throws -> [Export.Image] {
        let rows = try c.query("""
            SELECT i.path, i.path_bytes, i.format, i.size_bytes, l.label, l.confidence, l.zero_shot_label,
                   l.zero_shot_confidence, l.unreadable
            FROM nola.images i LEFT JOIN nola.labels l ON l.job_id = i.job_id AND l.path = i.path
            WHERE i.job_id = $1 ORDER BY i.path
            """, [job])
        return try rows.rows.map { r in
            let path = try r.string("path")
            return Export.Image(path: path, rawPath: try r.optionalString("path_bytes") == nil ? Array(path.utf8) : try r.bytes("path_bytes"),
                                format: try r.string("format"), sizeBytes: try r.int("size_bytes"),
                                label: try r.optionalString("label"), confidence: try r.optionalDouble("confidence"),
                                zeroShotLabel: try r.optionalString("zero_shot_label"),
                                zeroShotConfidence: try r.optionalDouble("zero_shot_confidence"),
                                unreadable: try r.optionalString("unreadable"))
        }
    }

    /// Every exported image must still be in the collection, at the size the job saw.
    private func checkSources(collection: String, _ images: [Export.Image]) throws {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: collection, isDirectory: &isDir), isDir.boolValue else {
            throw NoladError(.usage, "the collection folder \(collection) of job \(job) no longer exists (moved or deleted?); nothing was exported")
        }
        for image in images {
            let path = Array(collection.utf8) + [UInt8(ascii: "/")] + image.rawPath
            var st = stat()
            let rc = (path + [0]).withUnsafeBufferPointer { $0.withMemoryRebound(to: CChar.self) { stat($0.baseAddress!, &st) } }
            guard rc == 0, (st.st_mode & S_IFMT) == S_IFREG else {
                throw NoladError(.usage, "\(collection)/\(image.path) of job \(job) is missing from its collection (moved or deleted since the job ran); nothing was exported")
            }
            guard Int(st.st_size) == image.sizeBytes else {
                throw NoladError(.usage, "\(collection)/\(image.path) of job \(job) has changed since the job labelled it (\(st.st_size) bytes, it had \(image.sizeBytes)); nothing was exported")
            }
        }
    }

    /// A folder export inside the collection would be found (and labelled) by the next job on it.
    private func refuseInside(collection: String, _ destination: String) throws {
        let real = CollectionAccess.realPath(collection) ?? collection
        let parent = URL(fileURLWithPath: destination).deletingLastPathComponent().path
        let realParent = CollectionAccess.realPath(parent) ?? parent
        if CollectionAccess.isUnder(realParent, roots: [real]) {
            throw NoladError(.usage, "the output \(destination) is inside the job's collection \(collection); a later job on it would label the export too. Choose a folder outside it")
        }
    }
}

/// Writing exports so that a failure leaves nothing half-written under the output's name: everything
/// goes to a hidden temporary sibling first, which is renamed into place at the end.
enum ExportWriter {
    static func systemError(_ what: String) -> NoladError {
        NoladError(.usage, "\(what): \(String(cString: strerror(Glibc.errno)))")
    }

    /// The temporary sibling of `path`: same folder (so rename is atomic), hidden, unique to this process.
    static func temporary(for path: String, _ tag: String) -> String {
        let url = URL(fileURLWithPath: path)
        return url.deletingLastPathComponent().appendingPathComponent(".\(url.lastPathComponent).nolad-\(tag)-\(getpid())").path
    }

    static func requireParent(_ path: String) throws {
        let parent = URL(fileURLWithPath: path).deletingLastPathComponent().path
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: parent, isDirectory: &isDir), isDir.boolValue else {
            throw NoladError(.usage, "the folder \(parent) that would hold \(path) does not exist")
        }
    }

    /// Builds a folder export in a temporary folder with `fill`, then moves it to `path`. An existing
    /// `path` is replaced only when it is an empty folder, or with `force` a folder an earlier export
    /// wrote (it holds the marker file); anything else is refused before any work.
    static func writeFolder(at path: String, force: Bool, marker: String, fill: (String) throws -> Void) throws {
        try requireParent(path)
        let fm = FileManager.default
        var isDir: ObjCBool = false
        let exists = fm.fileExists(atPath: path, isDirectory: &isDir) || (try? fm.destinationOfSymbolicLink(atPath: path)) != nil
        var replace = false
        if exists {
            guard isDir.boolValue else { throw NoladError(.usage, "the output \(path) already exists and is not a folder; choose another --output") }
            let entries = (try? fm.contentsOfDirectory(atPath: path)) ?? []
            if !entries.isEmpty {
                guard entries.contains(Export.markerName) else {
                    throw NoladError(.usage, "the output folder \(path) already exists, is not empty and was not written by nolad export; choose another --output (--force replaces only an earlier export)")
                }
                guard force else { throw NoladError(.usage, "the output folder \(path) already holds an export; pass --force to replace it") }
            }
            replace = true
        }
        let temp = temporary(for: path, "tmp")
        try? fm.removeItem(atPath: temp)
        guard mkdir(temp, 0o755) == 0 else { throw systemError("cannot create \(temp)") }
        do {
            try fill(temp)
            try writeFile(temp + "/" + Export.markerName, marker)
            if replace {
                let old = temporary(for: path, "old")
                try? fm.removeItem(atPath: old)
                guard rename(path, old) == 0 else { throw systemError("cannot move the earlier \(path) aside") }
                guard rename(temp, path) == 0 else {
                    let e = systemError("cannot move the export to \(path)")
                    _ = rename(old, path)
                    throw e
                }
                try? fm.removeItem(atPath: old)
            } else {
                guard rename(temp, path) == 0 else { throw systemError("cannot move the export to \(path)") }
            }
        } catch {
            try? fm.removeItem(atPath: temp)
            throw error
        }
    }

    /// Writes files each through a temporary sibling; refuses before writing any when one exists and
    /// `force` is not given, or is a folder.
    static func writeFiles(_ files: [(path: String, text: String)], force: Bool) throws {
        for (path, _) in files {
            try requireParent(path)
            var isDir: ObjCBool = false
            if FileManager.default.fileExists(atPath: path, isDirectory: &isDir) {
                if isDir.boolValue { throw NoladError(.usage, "the output \(path) is a folder; choose a file name") }
                if !force { throw NoladError(.usage, "the output \(path) already exists; pass --force to replace it") }
            }
        }
        let temps = files.map { temporary(for: $0.path, "tmp") }
        do {
            for (file, temp) in zip(files, temps) { try writeFile(temp, file.text) }
            for (file, temp) in zip(files, temps) {
                guard rename(temp, file.path) == 0 else { throw systemError("cannot move the export to \(file.path)") }
            }
        } catch {
            for temp in temps { try? FileManager.default.removeItem(atPath: temp) }
            throw error
        }
    }

    static func writeFile(_ path: String, _ text: String) throws {
        guard FileManager.default.createFile(atPath: path, contents: Data(text.utf8)) else {
            throw NoladError(.usage, "cannot write \(path)")
        }
    }

    /// Puts one image at `destination` (creating its folder): a symlink to the absolute source path, a
    /// hard link, or a copy of the bytes. `source` is the exact byte path.
    static func place(source: [UInt8], at destination: String, link: Export.Link, display: String) throws {
        let folder = URL(fileURLWithPath: destination).deletingLastPathComponent().path
        if !FileManager.default.fileExists(atPath: folder) {
            try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        }
        let src = source + [0]
        let ok: Bool = src.withUnsafeBufferPointer { buffer in
            buffer.withMemoryRebound(to: CChar.self) { s in
                switch link {
                case .symlink: return symlink(s.baseAddress!, destination) == 0
                case .hardlink: return Glibc.link(s.baseAddress!, destination) == 0
                case .copy: return copyFile(s.baseAddress!, destination)
                }
            }
        }
        guard ok else {
            if link == .hardlink && Glibc.errno == EXDEV {
                throw NoladError(.usage, "cannot hardlink \(display): the output is on another file system than the collection; use --link symlink or --link copy")
            }
            throw systemError("cannot \(link == .copy ? "copy" : "link") \(display) to \(destination)")
        }
    }

    private static func copyFile(_ source: UnsafePointer<CChar>, _ destination: String) -> Bool {
        let input = open(source, O_RDONLY)
        guard input >= 0 else { return false }
        defer { close(input) }
        let output = open(destination, O_WRONLY | O_CREAT | O_EXCL, 0o644)
        guard output >= 0 else { return false }
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = read(input, &buffer, buffer.count)
            if n < 0 { close(output); return false }
            if n == 0 { break }
            var written = 0
            while written < n {
                let w = buffer.withUnsafeBytes { write(output, $0.baseAddress! + written, n - written) }
                if w <= 0 { close(output); return false }
                written += w
            }
        }
        return close(output) == 0
    }
}
