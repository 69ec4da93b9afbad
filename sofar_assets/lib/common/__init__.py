"""Small cross-cutting helpers: names as shown, free text, device choice, links between the UIs."""
