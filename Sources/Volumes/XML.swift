import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif

/// An element of a small XML document (EC2 answers), namespaces dropped.
struct XMLTree: Sendable {
    var name: String
    var text: String = ""
    var children: [XMLTree] = []

    func child(_ name: String) -> XMLTree? { children.first { $0.name == name } }
    /// The text of the first child called `name` ("" if none).
    subscript(_ name: String) -> String { child(name)?.text ?? "" }
    /// The `item` children of the child called `name` (EC2's list shape).
    func items(_ name: String) -> [XMLTree] { child(name)?.children.filter { $0.name == "item" } ?? [] }
    /// The first element called `name` anywhere below (depth first).
    func find(_ name: String) -> XMLTree? {
        for c in children {
            if c.name == name { return c }
            if let found = c.find(name) { return found }
        }
        return nil
    }

    static func parse(_ data: Data) -> XMLTree? {
        let parser = XMLParser(data: data)
        let builder = Builder()
        parser.delegate = builder
        guard parser.parse() else { return nil }
        return builder.root
    }

    private final class Builder: NSObject, XMLParserDelegate {
        var stack: [XMLTree] = []
        var root: XMLTree?

        func parser(_ parser: XMLParser, didStartElement elementName: String, namespaceURI: String?,
                    qualifiedName qName: String?, attributes attributeDict: [String: String] = [:]) {
            let local = elementName.split(separator: ":").last.map(String.init) ?? elementName
            stack.append(XMLTree(name: local))
        }

        func parser(_ parser: XMLParser, foundCharacters string: String) {
            guard !stack.isEmpty else { return }
            stack[stack.count - 1].text += string
        }

        func parser(_ parser: XMLParser, didEndElement elementName: String, namespaceURI: String?, qualifiedName qName: String?) {
            guard var done = stack.popLast() else { return }
            done.text = done.text.trimmingCharacters(in: .whitespacesAndNewlines)
            if stack.isEmpty { root = done } else { stack[stack.count - 1].children.append(done) }
        }
    }
}
